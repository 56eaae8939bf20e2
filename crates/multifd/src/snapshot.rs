//! Snapshot directories: what `receive --snapshot` stores and `send
//! --snapshot` replays.
//!
//! ```text
//! DIR/manifest.json   {"format": 1, "machine": "...", "ram_blocks": [...], ...}
//! DIR/ram/<block>.ram one sparse file per RAM block not placed elsewhere
//! DIR/prefix.bin      main-stream bytes before the ram section (header, configuration)
//! DIR/tail.bin        main-stream bytes after it (device state, EOF, vmdesc)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use multifd_wire::stream::RamBlockInfo;
use serde::{Deserialize, Serialize};

use crate::destination::{Incoming, RamProvider};
use crate::error::{Endpoint, Error, Result};
use crate::ram::{Access, GuestRam, RamBlock};
use crate::source::StreamPlan;

/// Version of the manifest layout.
pub const FORMAT: u32 = 1;

/// One RAM block in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBlock {
    /// RAM block id.
    pub idstr: String,
    /// Length in bytes.
    pub length: u64,
    /// Always 4096.
    pub page_size: u64,
    /// File holding the block: relative to the snapshot dir, or absolute
    /// when the block was received into a `--ram` file elsewhere.
    pub file: PathBuf,
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
    /// File with the verbatim stream prefix.
    pub prefix: PathBuf,
    /// File with the verbatim stream tail.
    pub tail: PathBuf,
}

fn file_name_for(idstr: &str) -> String {
    let safe: String = idstr
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.ram")
}

/// Supplies blocks for an incoming migration: named blocks from given
/// files, the rest as sparse files in a snapshot directory.
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
}

impl FileRamProvider {
    /// Blocks named in `named` go to those files, others to sparse files
    /// in `snapshot_dir` (an error when it is `None`).
    pub fn new(
        named: BTreeMap<String, PathBuf>,
        snapshot_dir: Option<PathBuf>,
        prefault: bool,
    ) -> Result<Self> {
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
        })
    }

    /// Whether any block has a destination at all.
    pub fn is_empty(&self) -> bool {
        self.named.is_empty() && self.snapshot_dir.is_none()
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
        let mut ram = GuestRam::new();
        for info in blocks {
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
                RamBlock::create_or_size_empty(&info.idstr, path, info.used_length)?
            } else if let Some(dir) = &self.snapshot_dir {
                let rel = Path::new("ram").join(file_name_for(&info.idstr));
                std::fs::create_dir_all(dir.join("ram"))
                    .map_err(|e| Error::io(format!("creating {}", dir.join("ram").display()), e))?;
                RamBlock::create_file(&info.idstr, &dir.join(rel), info.used_length)?
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

/// Writes the manifest, prefix and tail of a received migration into `dir`.
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
        let file = abs
            .strip_prefix(&canon)
            .map(Path::to_path_buf)
            .unwrap_or(abs);
        blocks.push(ManifestBlock {
            idstr: b.name().to_owned(),
            length: b.len(),
            page_size: multifd_wire::PAGE_SIZE_U64,
            file,
        });
    }
    std::fs::write(dir.join("prefix.bin"), &incoming.prefix)
        .map_err(|e| Error::io(ctx("prefix.bin"), e))?;
    std::fs::write(dir.join("tail.bin"), &incoming.tail)
        .map_err(|e| Error::io(ctx("tail.bin"), e))?;
    let manifest = Manifest {
        format: FORMAT,
        machine: incoming.configuration.machine.clone(),
        ram_blocks: blocks,
        ram_section_id: incoming.ram_section_id,
        switchover_start: incoming.switchover_start,
        prefix: "prefix.bin".into(),
        tail: "tail.bin".into(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    std::fs::write(dir.join("manifest.json"), json)
        .map_err(|e| Error::io(ctx("manifest.json"), e))?;
    Ok(manifest)
}

/// Reads a snapshot's manifest.
pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let bytes =
        std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::BadSnapshot {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if m.format != FORMAT {
        return Err(Error::BadSnapshot {
            path,
            reason: format!("format {} (this version reads format {FORMAT})", m.format),
        });
    }
    Ok(m)
}

/// Opens a snapshot for replay: its RAM (read-only) and its stream plan.
pub fn open(dir: &Path) -> Result<(GuestRam, StreamPlan, Manifest)> {
    let m = load_manifest(dir)?;
    let mut ram = GuestRam::new();
    for b in &m.ram_blocks {
        let path = dir.join(&b.file);
        ram.push(RamBlock::open_file(
            &b.idstr,
            &path,
            Access::ReadOnly,
            Some(b.length),
        )?)?;
    }
    let read = |p: &Path| {
        let path = dir.join(p);
        std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
    };
    let plan = StreamPlan {
        prefix: Some(read(&m.prefix)?),
        machine: m.machine.clone(),
        ram_section_id: m.ram_section_id,
        switchover_start: m.switchover_start,
        tail: Some(read(&m.tail)?),
    };
    Ok((ram, plan, m))
}
