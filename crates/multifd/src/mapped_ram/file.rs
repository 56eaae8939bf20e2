//! Opening a mapped-ram file, and writing its main stream where it goes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use multifd_wire::mapped_ram::{self, BlockLayout};
use multifd_wire::stream::{Command, Configuration, RamBlockInfo, encode, file as wire_file};

use super::FileUri;
use crate::error::{Error, Result};
use crate::transport::IoSlice;
use crate::transport::sys;

/// Opens (or creates) the file of `uri` for a new migration stream, the
/// way QEMU does: the file is cut to `uri.offset` bytes (what was before
/// the offset stays), and the stream is written from there.
///
/// At offset 0 the file must not exist (`O_EXCL|O_NOFOLLOW`, mode 0600:
/// a file or link already there is [`Error::FileExists`], never written
/// over); with an offset, an existing regular file is kept up to it (that
/// is what the offset is for). Returns the file and whether it was
/// created here (so a failed save removes it again).
pub(crate) fn create(uri: &FileUri) -> Result<(File, bool)> {
    let path = &uri.path;
    let ctx = || format!("creating migration file {}", path.display());
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).mode(0o600);
    let (file, ours) = if uri.offset == 0 {
        let f = opts
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::FileExists { path: path.clone() },
                _ => Error::io(ctx(), e),
            })?;
        (f, true)
    } else {
        match opts.clone().create_new(true).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let f = opts.open(path).map_err(|e| Error::io(ctx(), e))?;
                let md = f.metadata().map_err(|e| Error::io(ctx(), e))?;
                if !md.is_file() {
                    return Err(Error::Config(format!(
                        "{} is not a regular file",
                        path.display()
                    )));
                }
                (f, false)
            }
            Err(e) => return Err(Error::io(ctx(), e)),
        }
    };
    file.set_len(uri.offset)
        .map_err(|e| Error::io(format!("cutting {} to its offset", path.display()), e))?;
    Ok((file, ours))
}

/// Undoes [`create`] after a failure: removes a file made here (if its
/// path still leads to it), or cuts an existing one back to the offset.
///
/// `mapped`: parts of the file past the offset may still be mapped (a
/// capture whose RAM is still held). Cutting the file would make every
/// touch of those pages a SIGBUS, so the stream's magic is cleared
/// instead: no reader, ours or QEMU's, takes what follows the offset for a
/// migration. A failure here is logged: the caller is already failing
/// with the error that matters.
pub(crate) fn discard(uri: &FileUri, file: &File, ours: bool, mapped: bool) {
    let path = &uri.path;
    let outcome = if ours {
        // Only the file made here: not one put at the path since.
        match (std::fs::symlink_metadata(path), file.metadata()) {
            (Ok(at_path), Ok(made)) if FileId::from(&at_path) == FileId::from(&made) => {
                std::fs::remove_file(path).map_err(|e| format!("removing it: {e}"))
            }
            (Ok(_), Ok(_)) => Err("its path leads to another file now; left in place".into()),
            (Err(e), _) | (_, Err(e)) => Err(format!("looking at it: {e}")),
        }
    } else if mapped {
        file.write_all_at(&[0; 4], uri.offset)
            .map_err(|e| format!("clearing its magic: {e}"))
    } else {
        file.set_len(uri.offset)
            .map_err(|e| format!("cutting it back to {} bytes: {e}", uri.offset))
    };
    if let Err(why) = outcome {
        tracing::warn!(
            "an incomplete migration file {} stays: {why}",
            path.display()
        );
    }
}

/// Which file a descriptor is open on (its device and inode), so that a
/// path opened again can be told to lead to the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file `file` (opened from `path`) is open on.
    pub(crate) fn of(file: &File, path: &Path) -> Result<Self> {
        let md = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(Self::from(&md))
    }
}

impl From<&std::fs::Metadata> for FileId {
    fn from(md: &std::fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
        }
    }
}

/// Opens `path` once more for one channel: writing or reading, with
/// `O_DIRECT` when `direct` (a file system that refuses it is
/// [`Error::DirectIoUnsupported`]). It must still be the file `same_as`
/// (the one checked or created through the path before), else
/// [`Error::FileReplaced`].
pub(crate) fn open_channel(
    path: &Path,
    write: bool,
    direct: bool,
    same_as: FileId,
) -> Result<File> {
    let mut opts = OpenOptions::new();
    if write {
        opts.write(true);
    } else {
        opts.read(true);
    }
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts
        .open(path)
        .map_err(|e| direct_io_error(path, direct, e, "opening"))?;
    if FileId::of(&file, path)? != same_as {
        return Err(Error::FileReplaced {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// The error of an I/O call on `path`: `EINVAL` with `O_DIRECT` is the
/// file system refusing direct I/O.
pub(crate) fn direct_io_error(path: &Path, direct: bool, e: std::io::Error, what: &str) -> Error {
    if direct && e.raw_os_error() == Some(libc::EINVAL) {
        Error::DirectIoUnsupported {
            path: path.to_owned(),
            source: e,
        }
    } else if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
        Error::NoSpace {
            path: path.to_owned(),
            needed: 0,
            source: e,
        }
    } else {
        Error::io(format!("{what} {}", path.display()), e)
    }
}

/// Writes `bytes` at `offset` of `file`.
pub(crate) fn write_at(file: &File, path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    sys::pwritev_all(file.as_raw_fd(), offset, &mut [IoSlice::new(bytes)])
        .map_err(|e| direct_io_error(path, false, e, "writing"))
}

/// The main stream of a mapped-ram file, written at its places: it runs
/// from the offset of the file URI, and after each block's entry in the
/// `ram` START it jumps over the block's bitmap and pages regions.
pub(crate) struct FileStream {
    file: File,
    path: PathBuf,
    /// File offset of `buf[0]`.
    at: u64,
    buf: Vec<u8>,
}

/// Bytes gathered before they are written.
const FLUSH_AT: usize = 64 * 1024;

impl FileStream {
    /// A stream starting at `start` of `file`.
    pub(crate) fn new(file: File, path: &Path, start: u64) -> Self {
        Self {
            file,
            path: path.to_owned(),
            at: start,
            buf: Vec::new(),
        }
    }

    /// The file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Its path (for messages).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file offset of the next byte of the stream.
    pub(crate) fn position(&self) -> u64 {
        self.at + self.buf.len() as u64
    }

    fn encode_err(&self, e: multifd_wire::WireError) -> Error {
        Error::BadMappedRamFile {
            path: self.path.clone(),
            source: e,
        }
    }

    /// Writes what is pending.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            write_at(&self.file, &self.path, self.at, &self.buf)?;
            self.at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    fn flush_if_large(&mut self) -> Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// The file header and the configuration section, which announces the
    /// `mapped-ram` capability (a destination must have it on too).
    pub(crate) fn prefix(&mut self, cfg: &Configuration) -> Result<()> {
        let mut cfg = cfg.clone();
        if !cfg.capabilities.iter().any(|c| c == mapped_ram::CAPABILITY) {
            cfg.capabilities.push(mapped_ram::CAPABILITY.to_owned());
        }
        encode::header(&mut self.buf);
        encode::configuration(&mut self.buf, &cfg).map_err(|e| self.encode_err(e))?;
        Ok(())
    }

    /// The `ram` START with the block list: each block's entry, then a
    /// jump over its bitmap and pages regions (left as holes here).
    /// Returns the blocks' layouts, the ones a QEMU source would choose.
    pub(crate) fn ram_start(
        &mut self,
        section_id: u32,
        blocks: &[RamBlockInfo],
    ) -> Result<Vec<BlockLayout>> {
        encode::section_start(
            &mut self.buf,
            section_id,
            multifd_wire::stream::RAM_SECTION_IDSTR,
            0,
            multifd_wire::stream::RAM_SECTION_VERSION,
        )
        .map_err(|e| self.encode_err(e))?;
        wire_file::mem_size_header(&mut self.buf, blocks).map_err(|e| self.encode_err(e))?;
        let mut layouts = Vec::with_capacity(blocks.len());
        for b in blocks {
            let at = self.position();
            let layout =
                wire_file::block_entry(&mut self.buf, at, b).map_err(|e| self.encode_err(e))?;
            self.flush()?;
            self.at = layout.next_offset();
            layouts.push(layout);
        }
        Ok(layouts)
    }

    /// EOS and the section footer.
    pub(crate) fn eos(&mut self, section_id: u32) -> Result<()> {
        encode::eos(&mut self.buf);
        encode::section_footer(&mut self.buf, section_id);
        self.flush_if_large()
    }

    /// A `ram` PART header.
    pub(crate) fn part(&mut self, section_id: u32) {
        encode::section_part(&mut self.buf, section_id);
    }

    /// The `ram` END header.
    pub(crate) fn end(&mut self, section_id: u32) {
        encode::section_end(&mut self.buf, section_id);
    }

    /// A command.
    pub(crate) fn command(&mut self, cmd: Command) {
        encode::command(&mut self.buf, cmd);
    }

    /// Bytes copied verbatim (the device state, EOF and vmdesc).
    pub(crate) fn raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        self.flush_if_large()
    }

    /// Writes the pending bytes and cuts the file where the stream ends
    /// (QEMU's file ends with the vmdesc). Returns the file's length.
    pub(crate) fn finish(&mut self) -> Result<u64> {
        self.flush()?;
        let end = self.at;
        self.file
            .set_len(end)
            .map_err(|e| Error::io(format!("cutting {} to its end", self.path.display()), e))?;
        Ok(end)
    }
}

/// Writes each block's bitmap at its place (`bytes[i]` for `layouts[i]`).
pub(crate) fn write_bitmaps(
    file: &File,
    path: &Path,
    layouts: &[BlockLayout],
    bitmaps: impl IntoIterator<Item = Vec<u8>>,
) -> Result<()> {
    for (layout, bytes) in layouts.iter().zip(bitmaps) {
        if bytes.len() as u64 != layout.bitmap_len() {
            return Err(Error::Internal("a bitmap of the wrong size"));
        }
        write_at(file, path, layout.bitmap_offset(), &bytes)?;
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of `file` (a bitmap, a piece of the main
/// stream); the file must hold them.
pub(crate) fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::IncompleteFile {
                path: path.to_owned(),
                reason: format!("ends before byte {}", offset + len as u64),
            }
        } else {
            Error::io(format!("reading {}", path.display()), e)
        }
    })?;
    Ok(buf)
}
