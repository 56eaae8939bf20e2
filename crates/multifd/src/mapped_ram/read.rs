//! Reading a mapped-ram file's structure: its main stream (with the jumps
//! over each block's regions), the blocks' layouts and bitmaps, and the
//! device-state tail; every offset and length checked against the file
//! before it is used.

use std::fs::File;
use std::path::Path;

use multifd_wire::mapped_ram::{self, Bitmap, BlockLayout, check_file_layout};
use multifd_wire::stream::file::{FileDecoded, FileDecoder, FileEvent};
use multifd_wire::stream::{Command, Configuration, Event, RamBlockInfo, check_tail, encode};

use super::FileUri;
use super::file::{FileId, read_at};
use crate::destination::check_announced_ram;
use crate::error::{Error, Result};

/// Bytes of main stream read at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A mapped-ram file whose structure was read and checked; no page was
/// read yet.
#[derive(Debug, Clone)]
pub struct FileImage {
    /// The configuration section (it lists the `mapped-ram` capability).
    pub configuration: Configuration,
    /// Section id of `ram`.
    pub ram_section_id: u32,
    /// The RAM blocks, in the file's order.
    pub blocks: Vec<RamBlockInfo>,
    /// Where each block's header, bitmap and pages are (checked: read
    /// only, like `bitmaps`).
    layouts: Vec<BlockLayout>,
    /// Each block's bitmap, as in the file, checked against its layout.
    bitmaps: Vec<Vec<u8>>,
    /// Whether SWITCHOVER_START came before the `ram` END.
    pub switchover_start: bool,
    /// PART sections of `ram`.
    pub parts: u32,
    /// File offset where the device state starts.
    pub tail_offset: u64,
    /// The device state, EOF and vmdesc, verbatim.
    pub tail: Vec<u8>,
    /// The file's length.
    pub file_len: u64,
    /// The file that was read (a channel opening the path again must find
    /// it there).
    id: FileId,
}

impl FileImage {
    /// Where each block's header, bitmap and pages are, in the order of
    /// [`blocks`](Self::blocks).
    pub fn layouts(&self) -> &[BlockLayout] {
        &self.layouts
    }

    /// The bitmap of block `i`. Panics if `i` is not the index of a block.
    pub fn bitmap(&self, i: usize) -> Bitmap<'_> {
        Bitmap::for_layout(&self.bitmaps[i], &self.layouts[i])
            .expect("bitmaps are checked against their layouts when read, and never change")
    }

    pub(crate) fn id(&self) -> FileId {
        self.id
    }

    /// Pages of block `i` present in the file.
    pub fn present_pages(&self, i: usize) -> u64 {
        self.bitmap(i).count_present()
    }

    /// The configuration a network stream of the same migration has: the
    /// file's without the `mapped-ram` capability.
    pub fn network_configuration(&self) -> Configuration {
        let mut cfg = self.configuration.clone();
        cfg.capabilities.retain(|c| c != mapped_ram::CAPABILITY);
        cfg
    }

    /// The header and configuration of a network stream of the same
    /// migration (what a snapshot stores as its prefix).
    pub fn network_prefix(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        encode::header(&mut out);
        encode::configuration(&mut out, &self.network_configuration()).map_err(|e| {
            Error::Encode {
                endpoint: crate::error::Endpoint::Main,
                source: e,
            }
        })?;
        Ok(out)
    }
}

/// Bounds on what a file may make [`read_file`] allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most guest RAM the file's blocks may announce together: their
    /// bitmaps (a bit a page) are read into memory, and a file's length
    /// says little about what it costs (a sparse file can announce
    /// petabytes in a few kilobytes). Default: this machine's memory.
    pub max_ram: u64,
    /// Longest device-state tail read. Default: 32 MiB.
    pub max_tail: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_ram: crate::ram::physical_memory(),
            max_tail: 32 << 20,
        }
    }
}

/// Reads the structure of the mapped-ram file `uri`: its main stream from
/// `uri.offset`, each block's layout (checked against each other and the
/// file's length) and bitmap, and the tail (ending with EOF and a
/// vmdesc). A file that ends early (an interrupted save) is
/// [`Error::IncompleteFile`]; a broken one [`Error::BadMappedRamFile`]; one
/// announcing more RAM than `limits.max_ram` [`Error::RamLimit`] (before
/// any bitmap is read); a longer tail than `limits.max_tail`
/// [`Error::Unsupported`].
pub fn read_file(uri: &FileUri, limits: &ReadLimits) -> Result<FileImage> {
    let path = &uri.path;
    let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let md = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !md.is_file() {
        return Err(Error::Config(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    read_structure(&file, path, uri.offset, md.len(), limits)
}

fn bad(path: &Path, e: multifd_wire::WireError) -> Error {
    Error::BadMappedRamFile {
        path: path.to_owned(),
        source: e,
    }
}

fn incomplete(path: &Path, reason: impl Into<String>) -> Error {
    Error::IncompleteFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read_structure(
    file: &File,
    path: &Path,
    start: u64,
    file_len: u64,
    limits: &ReadLimits,
) -> Result<FileImage> {
    if start >= file_len {
        return Err(incomplete(
            path,
            format!(
                "the stream offset {start} is not before the end of the file ({file_len} bytes)"
            ),
        ));
    }
    let mut dec = FileDecoder::new(start).with_file_len(file_len);
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_at = start;
    let mut used = 0usize;
    let mut configuration = None;
    let mut section = None;
    let mut blocks = Vec::new();
    let mut layouts = Vec::new();
    let (mut switchover_start, mut parts, mut ended) = (false, 0u32, false);
    let tail_offset;
    loop {
        let pos = dec.position();
        if pos != buf_at + used as u64 {
            // A jump over a block's regions: drop the buffer.
            buf.clear();
            buf_at = pos;
            used = 0;
        }
        let decoded = dec.decode(&buf[used..]).map_err(|e| bad(path, e))?;
        let (event, consumed) = match decoded {
            FileDecoded::NeedMore { at_least } => {
                let have = buf.len() - used;
                let end = pos.saturating_add(at_least as u64);
                if end > file_len {
                    return Err(incomplete(
                        path,
                        format!(
                            "ends inside its main stream (an item at byte {pos} needs {at_least} bytes; \
                             the file has {file_len}): an interrupted save?"
                        ),
                    ));
                }
                buf.drain(..used);
                buf_at = pos;
                used = 0;
                let want = (at_least - have).max(READ_CHUNK);
                let len = want.min((file_len - pos - have as u64) as usize);
                let more = read_at(file, path, pos + have as u64, len)?;
                buf.extend_from_slice(&more);
                continue;
            }
            FileDecoded::Item { event, consumed } => (event, consumed),
        };
        used += consumed;
        match event {
            FileEvent::MemSize { .. } => {}
            FileEvent::Block { block, layout } => {
                blocks.push(block);
                layouts.push(layout);
            }
            FileEvent::Stream(ev) => match ev {
                Event::Header => {}
                Event::Configuration(c) => configuration = Some(c),
                Event::RamStart { section_id } => section = Some(section_id),
                Event::RamPart { .. } => parts += 1,
                Event::RamEnd { .. } => ended = true,
                Event::Eos | Event::Footer { .. } => {}
                Event::Command(Command::SwitchoverStart) => switchover_start = true,
                Event::Command(other) => {
                    return Err(Error::Unsupported(format!(
                        "{}: command {other:?} in a mapped-ram file",
                        path.display()
                    )));
                }
                Event::DeviceTail => {
                    tail_offset = pos;
                    break;
                }
                Event::Eof => {
                    tail_offset = pos;
                    break;
                }
                // The decoder gives these only in forms a file cannot have
                // (it refuses them itself) or only after EOF.
                other => {
                    return Err(Error::Unsupported(format!(
                        "{}: {other:?} in a mapped-ram file",
                        path.display()
                    )));
                }
            },
        }
    }
    let (Some(configuration), Some(ram_section_id)) = (configuration, section) else {
        return Err(Error::Internal(
            "the decoder reached the tail without a ram START",
        ));
    };
    if !ended {
        return Err(Error::Internal(
            "the decoder reached the tail without a ram END",
        ));
    }
    check_file_layout(&layouts, file_len).map_err(|e| bad(path, e))?;
    check_announced_ram(&blocks, limits.max_ram)?;
    let tail_len = file_len - tail_offset;
    if tail_len > limits.max_tail as u64 {
        return Err(Error::Unsupported(format!(
            "{}: {tail_len} bytes of device state, more than the limit of {}",
            path.display(),
            limits.max_tail
        )));
    }
    let tail = read_at(file, path, tail_offset, tail_len as usize)?;
    match check_tail(&tail) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(incomplete(path, "the device state ends without a vmdesc"));
        }
        Err(e) => {
            return Err(incomplete(
                path,
                format!("the device state does not end with EOF and a vmdesc ({e})"),
            ));
        }
    }
    let mut bitmaps = Vec::with_capacity(layouts.len());
    for l in &layouts {
        // Within the file (its layout was checked) and at most
        // `max_ram / 32768` bytes in all.
        let bytes = read_at(file, path, l.bitmap_offset(), l.bitmap_len() as usize)?;
        Bitmap::for_layout(&bytes, l).map_err(|e| bad(path, e))?;
        bitmaps.push(bytes);
    }
    Ok(FileImage {
        configuration,
        ram_section_id,
        blocks,
        layouts,
        bitmaps,
        switchover_start,
        parts,
        tail_offset,
        tail,
        file_len,
        id: FileId::of(file, path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapped_ram::file::FileStream;

    /// Writes a complete mapped-ram file, sparse, whose one block `m0`
    /// announces `len` bytes: a few KiB on the disk, whatever `len`.
    fn write_sparse(path: &Path, len: u64) {
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        let mut stream = FileStream::new(f, path, 0);
        let cfg = Configuration {
            machine: "none".into(),
            ..Configuration::default()
        };
        stream.prefix(&cfg).unwrap();
        let blocks = [RamBlockInfo {
            idstr: "m0".into(),
            used_length: len,
        }];
        stream.ram_start(2, &blocks).unwrap();
        stream.eos(2).unwrap();
        stream.end(2);
        stream.eos(2).unwrap();
        let mut tail = Vec::new();
        encode::eof(&mut tail);
        encode::vmdesc(&mut tail, b"{}").unwrap();
        stream.raw(&tail).unwrap();
        stream.finish().unwrap();
    }

    /// A sparse file announcing 4 TiB of RAM (a 128 MiB bitmap) is refused
    /// by the RAM limit before any bitmap is read; the same file with a
    /// small block reads.
    #[test]
    fn a_file_announcing_more_ram_than_the_limit_is_refused_before_its_bitmaps_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let huge = FileUri::new(dir.path().join("huge.mr"));
        write_sparse(&huge.path, 4 << 40);
        assert!(std::fs::metadata(&huge.path).unwrap().len() > 4 << 40);
        let limits = ReadLimits {
            max_ram: 1 << 30,
            ..ReadLimits::default()
        };
        match read_file(&huge, &limits) {
            Err(Error::RamLimit { announced, limit }) => {
                assert_eq!((announced, limit), (4 << 40, 1 << 30));
            }
            other => panic!("{other:?}"),
        }
        // Played to a destination: refused before any RAM is made or any
        // connection tried.
        let nowhere = crate::transport::Uri::Unix(dir.path().join("no.sock"));
        let e = crate::mapped_ram::play(
            &huge,
            &nowhere,
            &crate::source::SourceOptions::default(),
            &crate::mapped_ram::FileOptions::default(),
            &limits,
            &crate::stats::Progress::default(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::RamLimit { .. }), "{e:?}");
        let small = FileUri::new(dir.path().join("small.mr"));
        write_sparse(&small.path, 1 << 30);
        let image = read_file(&small, &limits).unwrap();
        assert_eq!(image.present_pages(0), 0);
        assert_eq!(image.blocks[0].used_length, 1 << 30);
    }
}
