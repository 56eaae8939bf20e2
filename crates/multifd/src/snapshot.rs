//! Snapshot directories: what `receive --snapshot` stores and `send
//! --snapshot` replays.
//!
//! ```text
//! DIR/manifest.json          {"format": 1, "machine": "...", "ram_blocks": [...], ...}
//! DIR/ram/NNNN-<name>.ram    one file per RAM block not placed elsewhere
//! DIR/prefix.bin             main-stream bytes before the ram section (header, configuration)
//! DIR/tail.bin               main-stream bytes after it (device state, EOF, vmdesc)
//! ```
//!
//! A block's file is named by [`block_file_name`]: its index in the
//! source's block list, which makes names unique whatever the block ids
//! are, and a readable, file-name-safe form of its id.
//!
//! Writing never follows a symbolic link and never writes over a file:
//! block files, `prefix.bin` and `tail.bin` are created exclusively
//! (`O_CREAT|O_EXCL|O_NOFOLLOW`), `manifest.json` is published last, from
//! a temporary file, with `link`, which does not replace anything either;
//! a directory that already holds a snapshot (or any block file) is
//! [`Error::FileExists`]. Block files have their space reserved as they
//! are created (see [`RamBlock::create_file`]); [`store`] gives the space
//! of never-written pages back afterwards.
//!
//! Reading trusts nothing in the manifest: every path it names must be a
//! relative path that stays inside the directory once symbolic links are
//! resolved, name a regular file, and have the length the manifest says;
//! names, lengths and page sizes are checked like the wire's. A block the
//! receiver wrote into a file outside the directory (`receive --ram
//! ID=FILE`) is recorded as *external*: [`open`] maps it only from a file
//! its caller names, and fails with [`Error::ExternalBlock`] otherwise.
//! Everything wrong with a manifest is [`Error::BadSnapshot`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use multifd_wire::stream::RamBlockInfo;
use serde::{Deserialize, Serialize};

use crate::destination::{Incoming, RamProvider};
use crate::error::{Endpoint, Error, Result};
use crate::ram::{Access, GuestRam, RamBlock, Reserve};
use crate::source::StreamPlan;

/// Version of the manifest layout.
pub const FORMAT: u32 = 1;

/// Name of the manifest inside a snapshot directory.
pub const MANIFEST: &str = "manifest.json";
/// Name of the stream prefix file.
const PREFIX: &str = "prefix.bin";
/// Name of the stream tail file.
const TAIL: &str = "tail.bin";
/// Sub-directory of the block files.
const RAM_DIR: &str = "ram";

/// Longest `manifest.json` read (one of 1024 blocks with 255-byte names
/// is about 600 KiB).
pub const MAX_MANIFEST: u64 = 16 << 20;
/// Longest `prefix.bin` / `tail.bin` read on replay (a receiver keeps at
/// most `ReceiveOptions::max_tail`, 32 MiB by default).
pub const MAX_STREAM_FILE: u64 = 256 << 20;
/// Longest readable part of a block file name: with the index (at most 20
/// digits), the dash and `.ram`, a name stays below 230 bytes, within the
/// 255 bytes file systems allow.
const READABLE_MAX: usize = 200;

/// One RAM block in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBlock {
    /// RAM block id.
    pub idstr: String,
    /// Length in bytes.
    pub length: u64,
    /// Always 4096.
    pub page_size: u64,
    /// File holding the block, relative to the snapshot directory
    /// (`ram/0003-pc.ram`). For an external block: the absolute path it
    /// was received into, for information only (never opened unless the
    /// caller of [`open`] names it).
    pub file: PathBuf,
    /// The block was received into a file outside the snapshot directory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
}

impl ManifestBlock {
    /// Whether the block's file is outside the snapshot directory: marked
    /// so, or (manifests written before the mark existed) named by an
    /// absolute path.
    pub fn is_external(&self) -> bool {
        self.external || self.file.is_absolute()
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// QEMU machine type of the source.
    pub machine: String,
    /// RAM blocks in the source's order.
    pub ram_blocks: Vec<ManifestBlock>,
    /// Section id of `ram` in the source's stream.
    pub ram_section_id: u32,
    /// Whether the source sent SWITCHOVER_START.
    pub switchover_start: bool,
    /// File with the verbatim stream prefix, relative to the directory.
    pub prefix: PathBuf,
    /// File with the verbatim stream tail, relative to the directory.
    pub tail: PathBuf,
}

/// The file name of block number `index` (its place in the source's block
/// list) called `idstr`: `{index:04}-{readable}.ram`, where `readable` is
/// `idstr` with every run of characters outside `[A-Za-z0-9.-]` turned
/// into one `_`, without `_` at either end, cut to 200 bytes
/// (`/rom@etc/acpi/tables` at index 3 is `0003-rom_etc_acpi_tables.ram`);
/// `{index:04}.ram` when nothing readable is left.
///
/// Injective within a snapshot: the index is unique in a block list and is
/// read back up to the first `-` or `.`, which it never contains. Any id
/// (1 to 255 bytes, anything UTF-8) gives a valid name below 230 bytes
/// with no `/`, no NUL and no leading `.`.
pub fn block_file_name(index: usize, idstr: &str) -> String {
    let mut readable = String::with_capacity(idstr.len().min(READABLE_MAX));
    let mut gap = false;
    for c in idstr.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            if gap && !readable.is_empty() {
                readable.push('_');
            }
            gap = false;
            readable.push(c);
        } else {
            gap = true;
        }
        if readable.len() >= READABLE_MAX {
            break;
        }
    }
    // ASCII only, so any cut is on a character boundary.
    readable.truncate(READABLE_MAX);
    if readable.is_empty() {
        format!("{index:04}.ram")
    } else {
        format!("{index:04}-{readable}.ram")
    }
}

/// Fails unless `dir` holds no snapshot files yet: no manifest, prefix or
/// tail, and a `ram/` that is missing or an empty real directory.
fn check_fresh(dir: &Path) -> Result<()> {
    for name in [MANIFEST, PREFIX, TAIL] {
        let path = dir.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(Error::FileExists { path });
        }
    }
    let ram = dir.join(RAM_DIR);
    match ram.symlink_metadata() {
        Ok(md) if md.is_dir() => {
            let mut entries = std::fs::read_dir(&ram)
                .map_err(|e| Error::io(format!("listing {}", ram.display()), e))?;
            if let Some(entry) = entries.next() {
                let entry =
                    entry.map_err(|e| Error::io(format!("listing {}", ram.display()), e))?;
                return Err(Error::FileExists { path: entry.path() });
            }
            Ok(())
        }
        Ok(_) => Err(Error::FileExists { path: ram }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("looking at {}", ram.display()), e)),
    }
}

/// Creates `dir/ram` (and `dir`) if needed; it must be a real directory,
/// not a symbolic link planted there.
fn ram_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let ram = dir.join(RAM_DIR);
    match std::fs::create_dir(&ram) {
        Ok(()) => Ok(ram),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let md = ram
                .symlink_metadata()
                .map_err(|e| Error::io(format!("looking at {}", ram.display()), e))?;
            if md.is_dir() {
                Ok(ram)
            } else {
                Err(Error::FileExists { path: ram })
            }
        }
        Err(e) => Err(Error::io(format!("creating {}", ram.display()), e)),
    }
}

/// Supplies blocks for an incoming migration: named blocks from given
/// files, the rest as new files in a snapshot directory.
///
/// Named files that already exist are mapped by [`FileRamProvider::new`],
/// before any connection arrives, the way a QEMU destination's RAM exists
/// before `migrate-incoming`; with `prefault` they are also zeroed then, so
/// that zero pages need no work during the migration.
#[derive(Debug, Default)]
pub struct FileRamProvider {
    named: BTreeMap<String, PathBuf>,
    snapshot_dir: Option<PathBuf>,
    ready: BTreeMap<String, RamBlock>,
    /// Whether new files on tmpfs get their space reserved (see
    /// [`FileRamProvider::written_through_files`]).
    reserve: Reserve,
    /// The block files made in the snapshot directory for the RAM given
    /// out (see [`FileRamProvider::discard_created`]).
    created: Vec<PathBuf>,
}

impl FileRamProvider {
    /// Blocks named in `named` go to those files, others to new files in
    /// `snapshot_dir` (an error when it is `None`). A snapshot directory
    /// that already holds a snapshot or a block file is
    /// [`Error::FileExists`], before anything is mapped.
    pub fn new(
        named: BTreeMap<String, PathBuf>,
        snapshot_dir: Option<PathBuf>,
        prefault: bool,
    ) -> Result<Self> {
        if let Some(dir) = &snapshot_dir {
            check_fresh(dir)?;
        }
        let mut ready = BTreeMap::new();
        for (id, path) in &named {
            let exists = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
            if exists {
                let mut block = RamBlock::open_file(id, path, Access::ReadWrite, None)?;
                if prefault {
                    block.prefault()?;
                }
                ready.insert(id.clone(), block);
            }
        }
        Ok(Self {
            named,
            snapshot_dir,
            ready,
            reserve: Reserve::Always,
            created: Vec::new(),
        })
    }

    /// For a consumer that writes the pages of the files it is given only
    /// through their descriptors (a mapped-ram restore): new files on
    /// tmpfs are then not reserved. There a full file system fails a
    /// write with an error, not a SIGBUS, and reserving would allocate
    /// (and clear) memory for every page the image does not hold, which
    /// the restore leaves as holes, as QEMU's restored RAM has them.
    pub fn written_through_files(mut self) -> Self {
        self.reserve = Reserve::NotOnTmpfs;
        self
    }

    /// Removes the block files this provider made in the snapshot
    /// directory, after the receive or restore it provided RAM for failed:
    /// they hold part of a migration, and would make the next attempt
    /// into the same directory [`Error::FileExists`]. Files named with
    /// `--ram` (given by path) stay, written in part. Failures to remove
    /// are logged: the caller is already failing with the error that
    /// matters.
    pub fn discard_created(&mut self) {
        for path in self.created.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(
                    "a block file of a failed migration stays: {}: {e}",
                    path.display()
                );
            }
        }
    }

    /// Whether any block has a destination at all.
    pub fn is_empty(&self) -> bool {
        self.named.is_empty() && self.snapshot_dir.is_none()
    }

    fn provide_all(
        &mut self,
        blocks: &[RamBlockInfo],
        created: &mut Vec<PathBuf>,
    ) -> Result<GuestRam> {
        let mut ram = GuestRam::new();
        let mut ram_dir_path = None;
        for (index, info) in blocks.iter().enumerate() {
            let block = if let Some(block) = self.ready.remove(&info.idstr) {
                if block.len() != info.used_length {
                    return Err(Error::Mismatch(format!(
                        "RAM block {:?} is {} bytes at the source but its file is {} bytes",
                        info.idstr,
                        info.used_length,
                        block.len()
                    )));
                }
                block
            } else if let Some(path) = self.named.get(&info.idstr) {
                RamBlock::create_or_size_empty(&info.idstr, path, info.used_length, self.reserve)?
            } else if let Some(dir) = &self.snapshot_dir {
                let ram_dir = match &ram_dir_path {
                    Some(p) => p,
                    None => ram_dir_path.insert(ram_dir(dir)?),
                };
                let path = ram_dir.join(block_file_name(index, &info.idstr));
                let block =
                    RamBlock::create_reserving(&info.idstr, &path, info.used_length, self.reserve)?;
                created.push(path);
                block
            } else {
                // Neither a file for it nor a directory for the rest.
                return Err(Error::UnknownBlock {
                    endpoint: Endpoint::Main,
                    name: info.idstr.clone(),
                });
            };
            ram.push(block)?;
        }
        Ok(ram)
    }
}

impl RamProvider for FileRamProvider {
    fn provide(&mut self, blocks: &[RamBlockInfo]) -> Result<GuestRam> {
        for name in self.named.keys() {
            if !blocks.iter().any(|b| &b.idstr == name) {
                return Err(Error::Mismatch(format!(
                    "a RAM file is given for block {name:?}, but the source has blocks {:?}",
                    blocks.iter().map(|b| b.idstr.as_str()).collect::<Vec<_>>()
                )));
            }
        }
        let mut created = Vec::new();
        let result = self.provide_all(blocks, &mut created);
        self.created.append(&mut created);
        if result.is_err() {
            // Files of ours in the snapshot directory would make the next
            // attempt fail with FileExists: take them back (the mappings
            // are gone with the partial RAM).
            self.discard_created();
        }
        result
    }
}

/// Creates `dir/name` exclusively (never through a link, never over a
/// file) and writes `bytes` into it.
fn write_new(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::FileExists { path: path.clone() },
            _ => Error::io(format!("creating {}", path.display()), e),
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Publishes `dir/name` with `bytes` all at once: written to a new
/// temporary file first, then linked to its name (`link` never replaces
/// an existing file or link), so a reader sees all of it or nothing.
fn publish(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp_name = format!(".{name}.{}.tmp", std::process::id());
    write_new(dir, &tmp_name, bytes)?;
    let (tmp, path) = (dir.join(&tmp_name), dir.join(name));
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::FileExists { path: path.clone() },
        _ => Error::io(format!("publishing {}", path.display()), e),
    })
}

/// Writes the manifest, prefix and tail of a received migration into `dir`
/// (after its blocks were received there by a [`FileRamProvider`]), and
/// gives back the file space of block pages that were never written (the
/// space was reserved when the files were created; see
/// [`RamBlock::release_unwritten`]). Blocks in files outside `dir` are
/// recorded as external.
pub fn store(dir: &Path, incoming: &Incoming) -> Result<Manifest> {
    let ctx = |what: &str| format!("writing {what} in {}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(ctx("the directory"), e))?;
    let canon = dir
        .canonicalize()
        .map_err(|e| Error::io(ctx("the directory"), e))?;
    let mut blocks = Vec::new();
    for b in incoming.ram.blocks() {
        let path = b.path().ok_or_else(|| {
            Error::Config(format!(
                "RAM block {:?} is not backed by a file, so a snapshot cannot refer to it",
                b.name()
            ))
        })?;
        let abs = path
            .canonicalize()
            .map_err(|e| Error::io(ctx("a block path"), e))?;
        let inside = abs
            .strip_prefix(&canon)
            .ok()
            .filter(|rel| check_relative(rel).is_ok())
            .map(Path::to_path_buf);
        let (file, external) = match inside {
            Some(rel) => {
                // Reserved space the migration did not write: back to holes.
                if let Err(e) = b.release_unwritten() {
                    tracing::warn!(block = b.name(), error = %e, "could not release unwritten space");
                }
                (rel, false)
            }
            None => (abs, true),
        };
        blocks.push(ManifestBlock {
            idstr: b.name().to_owned(),
            length: b.len(),
            page_size: multifd_wire::PAGE_SIZE_U64,
            file,
            external,
        });
    }
    write_new(dir, PREFIX, &incoming.prefix)?;
    write_new(dir, TAIL, &incoming.tail)?;
    let manifest = Manifest {
        format: FORMAT,
        machine: incoming.configuration.machine.clone(),
        ram_blocks: blocks,
        ram_section_id: incoming.ram_section_id,
        switchover_start: incoming.switchover_start,
        prefix: PREFIX.into(),
        tail: TAIL.into(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    publish(dir, MANIFEST, &json)?;
    Ok(manifest)
}

/// Whether `p` is a path the manifest may name inside the directory: not
/// empty, relative, plain names separated by single slashes (no `..`, no
/// `.`, no empty segment), no NUL byte. Checked on the bytes, since
/// `Path::components` quietly drops inner `.` and doubled slashes.
fn check_relative(p: &Path) -> std::result::Result<(), &'static str> {
    let bytes = p.as_os_str().as_encoded_bytes();
    if bytes.is_empty() {
        return Err("an empty path");
    }
    if bytes.contains(&0) {
        return Err("a NUL byte in a path");
    }
    if bytes[0] == b'/' {
        return Err("an absolute path");
    }
    for segment in bytes.split(|&b| b == b'/') {
        match segment {
            b"" => return Err("an empty path segment"),
            b"." => return Err("a path with `.`"),
            b".." => return Err("a path with `..`"),
            _ => {}
        }
    }
    Ok(())
}

/// Reads a regular file of at most `limit` bytes without following a
/// symbolic link at its last component and without blocking on a FIFO.
fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::BadSnapshot {
        path: path.to_owned(),
        reason,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => bad("is a symbolic link".into()),
            _ if e.kind() == std::io::ErrorKind::NotFound => bad("missing".into()),
            _ => Error::io(format!("reading {}", path.display()), e),
        })?;
    let md = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !md.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if md.len() > limit {
        return Err(bad(format!(
            "{} bytes, more than the limit of {limit}",
            md.len()
        )));
    }
    let mut out = Vec::with_capacity(md.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if out.len() as u64 > limit {
        return Err(bad(format!("more than the limit of {limit} bytes")));
    }
    Ok(out)
}

/// Checks what a manifest says that does not need the files: format, block
/// names, lengths, page sizes, and that every in-directory path is a plain
/// relative one.
fn validate(m: &Manifest, path: &Path) -> Result<()> {
    let bad = |reason: String| Error::BadSnapshot {
        path: path.to_owned(),
        reason,
    };
    if m.format != FORMAT {
        return Err(bad(format!(
            "format {} (this version reads format {FORMAT})",
            m.format
        )));
    }
    let mut names = BTreeSet::new();
    for b in &m.ram_blocks {
        if b.idstr.is_empty() || b.idstr.len() > 255 {
            return Err(bad(format!(
                "block id {:?}: must be 1 to 255 bytes",
                b.idstr
            )));
        }
        if !names.insert(b.idstr.as_str()) {
            return Err(bad(format!("block {:?} is listed twice", b.idstr)));
        }
        if b.page_size != multifd_wire::PAGE_SIZE_U64 {
            return Err(bad(format!(
                "block {:?}: page size {} (only 4096 is supported)",
                b.idstr, b.page_size
            )));
        }
        if b.length == 0 || !b.length.is_multiple_of(multifd_wire::PAGE_SIZE_U64) {
            return Err(bad(format!(
                "block {:?}: length {} is not a non-zero multiple of 4096",
                b.idstr, b.length
            )));
        }
        if !b.is_external() {
            check_relative(&b.file)
                .map_err(|why| bad(format!("block {:?}: {why} ({})", b.idstr, b.file.display())))?;
        }
    }
    for (what, p) in [("prefix", &m.prefix), ("tail", &m.tail)] {
        check_relative(p).map_err(|why| bad(format!("{what}: {why} ({})", p.display())))?;
    }
    Ok(())
}

/// Reads and checks a snapshot's manifest: format, block ids (1 to 255
/// bytes, unique), lengths (non-zero multiples of 4096), page sizes (4096)
/// and that every path it names in the directory is a plain relative one.
/// The files themselves are checked by [`open`] (and [`resolve`]).
/// `manifest.json` must be a regular file of at most [`MAX_MANIFEST`]
/// bytes, not a symbolic link.
pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = read_capped(&path, MAX_MANIFEST)?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::BadSnapshot {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    validate(&m, &path)?;
    Ok(m)
}

/// The file a manifest names by `file`, relative to the snapshot directory
/// `dir`: fails with [`Error::BadSnapshot`] unless it is a plain relative
/// path that, once every symbolic link is resolved, names a regular file
/// inside `dir`. Returns the resolved path.
pub fn resolve(dir: &Path, file: &Path) -> Result<PathBuf> {
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("opening snapshot {}", dir.display()), e))?;
    resolve_in(&canon_dir, file)
}

fn resolve_in(canon_dir: &Path, file: &Path) -> Result<PathBuf> {
    let joined = canon_dir.join(file);
    let bad = |reason: String| Error::BadSnapshot {
        path: joined.clone(),
        reason,
    };
    check_relative(file).map_err(|why| bad(why.to_owned()))?;
    let canon = joined.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("missing".into()),
        _ => Error::io(format!("resolving {}", joined.display()), e),
    })?;
    if !canon.starts_with(canon_dir) {
        return Err(bad(format!(
            "leads outside the snapshot directory (to {})",
            canon.display()
        )));
    }
    let md = canon
        .metadata()
        .map_err(|e| Error::io(format!("looking at {}", canon.display()), e))?;
    if !md.is_file() {
        return Err(bad("not a regular file".into()));
    }
    Ok(canon)
}

/// Opens a snapshot for replay: its RAM (read-only) and its stream plan.
///
/// `external` names files for blocks by id: every external block of the
/// manifest must be named there ([`Error::ExternalBlock`] otherwise), and a
/// block inside the directory may be named too, to replay another file in
/// its place. A name that is not a block of the snapshot is
/// [`Error::Mismatch`]; a named file must have the block's length.
pub fn open(
    dir: &Path,
    external: &BTreeMap<String, PathBuf>,
) -> Result<(GuestRam, StreamPlan, Manifest)> {
    let m = load_manifest(dir)?;
    for name in external.keys() {
        if !m.ram_blocks.iter().any(|b| &b.idstr == name) {
            return Err(Error::Mismatch(format!(
                "a RAM file is given for block {name:?}, but the snapshot has blocks {:?}",
                m.ram_blocks
                    .iter()
                    .map(|b| b.idstr.as_str())
                    .collect::<Vec<_>>()
            )));
        }
    }
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("opening snapshot {}", dir.display()), e))?;
    let mut ram = GuestRam::new();
    for b in &m.ram_blocks {
        let block = if let Some(path) = external.get(&b.idstr) {
            RamBlock::open_file(&b.idstr, path, Access::ReadOnly, Some(b.length))?
        } else if b.is_external() {
            return Err(Error::ExternalBlock {
                block: b.idstr.clone(),
                recorded: b.file.clone(),
            });
        } else {
            let path = resolve_in(&canon_dir, &b.file)?;
            let len = path
                .metadata()
                .map_err(|e| Error::io(format!("looking at {}", path.display()), e))?
                .len();
            if len != b.length {
                return Err(Error::BadSnapshot {
                    path,
                    reason: format!(
                        "{len} bytes, but the manifest says block {:?} is {}",
                        b.idstr, b.length
                    ),
                });
            }
            RamBlock::open_file(&b.idstr, &path, Access::ReadOnly, Some(b.length))?
        };
        ram.push(block)?;
    }
    let read = |p: &Path| read_capped(&resolve_in(&canon_dir, p)?, MAX_STREAM_FILE);
    let plan = StreamPlan {
        prefix: Some(read(&m.prefix)?),
        machine: m.machine.clone(),
        ram_section_id: m.ram_section_id,
        switchover_start: m.switchover_start,
        tail: Some(read(&m.tail)?),
    };
    Ok((ram, plan, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block files made for a migration that then failed are removed
    /// by `discard_created`, and the directory takes the next attempt; a
    /// file named by path stays.
    #[test]
    fn block_files_of_a_failed_migration_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let named = dir.path().join("m0.ram");
        let blocks = [
            RamBlockInfo {
                idstr: "m0".into(),
                used_length: 16 * 4096,
            },
            RamBlockInfo {
                idstr: "pc.bios".into(),
                used_length: 4 * 4096,
            },
        ];
        let names = || [("m0".to_owned(), named.clone())].into_iter().collect();
        let mut provider = FileRamProvider::new(names(), Some(snap.clone()), false).unwrap();
        let ram = provider.provide(&blocks).unwrap();
        ram.blocks()[1].write_page(0, &[7; 4096]).unwrap();
        let made = snap.join(RAM_DIR).join(block_file_name(1, "pc.bios"));
        assert!(made.exists());
        // The migration fails with its RAM still mapped.
        provider.discard_created();
        assert!(!made.exists());
        assert!(named.exists());
        drop(ram);
        let mut again = FileRamProvider::new(names(), Some(snap.clone()), false).unwrap();
        again.provide(&blocks).unwrap();
        assert!(made.exists());
        assert!(matches!(
            FileRamProvider::new(names(), Some(snap), false),
            Err(Error::FileExists { .. })
        ));
    }

    #[test]
    fn block_file_names_are_injective_readable_and_short() {
        assert_eq!(
            block_file_name(3, "/rom@etc/acpi/tables"),
            "0003-rom_etc_acpi_tables.ram"
        );
        assert_eq!(block_file_name(0, "pc.ram"), "0000-pc.ram.ram");
        assert_eq!(
            block_file_name(12, "0000:00:02.0/vga.vram"),
            "0012-0000_00_02.0_vga.vram.ram"
        );
        assert_eq!(block_file_name(7, "\u{1f980}\u{e9}"), "0007.ram");
        assert_eq!(block_file_name(12345, "m0"), "12345-m0.ram");
        // Names that used to share a file.
        let ids = [
            "a/b", "a_b", "a b", "a\u{e9}b", "a\u{e8}b", "a//b", "..", ".", "-",
        ];
        let names: BTreeSet<String> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| block_file_name(i, id))
            .collect();
        assert_eq!(names.len(), ids.len(), "{names:?}");
        for long in ["x".repeat(255), "\u{e9}".repeat(127), "a/".repeat(127)] {
            let n = block_file_name(usize::MAX, &long);
            assert!(n.len() < 255, "{} bytes", n.len());
        }
        for (i, id) in ids.iter().enumerate() {
            let n = block_file_name(i, id);
            assert!(
                !n.starts_with('.') && !n.contains('/') && !n.contains('\0'),
                "{n}"
            );
            assert!(check_relative(Path::new(&n)).is_ok(), "{n}");
        }
    }

    #[test]
    fn manifest_paths_must_stay_relative_and_plain() {
        for ok in ["ram/0000-m0.ram", "x"] {
            assert!(check_relative(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "ram/../../x",
            "./x",
            "ram/./x",
            "ram//x",
            "ram/",
            "a\0b",
            "..",
        ] {
            assert!(check_relative(Path::new(bad)).is_err(), "{bad:?}");
        }
    }
}
