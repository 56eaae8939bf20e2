//! `multifd inspect`: human-readable summaries of snapshots and captures.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use multifd_wire::packet::{
    COMMON_HEADER_SIZE, CommonHeader, DEVICE_STATE_HEADER_SIZE, DeviceStateHeader,
    INIT_PACKET_SIZE, InitPacket, MULTIFD_MAGIC, PacketKind, RAM_PACKET_HEADER_SIZE,
    RamPacketHeader,
};
use multifd_wire::stream::{Decoded, Decoder, Event, QEVM_MAGIC, check_tail};

/// Prints a summary of `path`.
pub fn run(path: &Path) -> Result<()> {
    if path.is_dir() {
        return snapshot(path);
    }
    if announces_mapped_ram(path)? {
        return crate::file::inspect(path);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 4 {
        bail!("{}: too short to be a migration capture", path.display());
    }
    match u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) {
        QEVM_MAGIC => main_stream(&bytes),
        MULTIFD_MAGIC => multifd_channel(&bytes),
        m => bail!("{}: unknown magic {m:#010x}", path.display()),
    }
}

/// Whether the file is a main stream whose configuration announces the
/// `mapped-ram` capability (a mapped-ram migration file).
fn announces_mapped_ram(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut dec = Decoder::new();
    let mut pos = 0;
    for _ in 0..2 {
        match dec.decode(&head[pos..]) {
            Ok(Decoded::Item {
                event: Event::Configuration(c),
                ..
            }) => return Ok(c.capabilities.iter().any(|c| c == "mapped-ram")),
            Ok(Decoded::Item { consumed, .. }) => pos += consumed,
            _ => return Ok(false),
        }
    }
    Ok(false)
}

fn snapshot(dir: &Path) -> Result<()> {
    let m = multifd::snapshot::load_manifest(dir)?;
    println!("snapshot {} (format {})", dir.display(), m.format);
    println!("  machine: {}", m.machine);
    println!(
        "  ram section id: {}, switchover-start: {}",
        m.ram_section_id, m.switchover_start
    );
    for b in &m.ram_blocks {
        let path = dir.join(&b.file);
        let allocated = std::fs::metadata(&path)
            .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
            .unwrap_or(0);
        println!(
            "  block {:<28} {:>12} bytes  file {} ({} allocated)",
            b.idstr,
            b.length,
            b.file.display(),
            bytesize::ByteSize(allocated)
        );
    }
    let prefix = std::fs::read(dir.join(&m.prefix)).unwrap_or_default();
    let tail = std::fs::read(dir.join(&m.tail)).unwrap_or_default();
    println!(
        "  stream prefix: {} bytes, device-state tail: {} bytes",
        prefix.len(),
        tail.len()
    );
    if let Ok(Some(json)) = check_tail(&tail) {
        vmdesc_summary(json);
    }
    Ok(())
}

fn vmdesc_summary(json: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        println!("  vmdesc: {} bytes (not JSON)", json.len());
        return;
    };
    let names: Vec<String> = v["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| d["name"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default();
    println!("  vmdesc: {} devices: {}", names.len(), names.join(", "));
}

fn main_stream(bytes: &[u8]) -> Result<()> {
    let mut dec = Decoder::new();
    let mut pos = 0;
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    println!("main stream capture, {} bytes", bytes.len());
    loop {
        match dec.decode(&bytes[pos..]).context("decoding")? {
            Decoded::NeedMore { .. } => {
                println!("  (capture ends inside an item at byte {pos})");
                break;
            }
            Decoded::Item { event, consumed } => {
                pos += consumed;
                let key = match &event {
                    Event::Header => "header",
                    Event::Configuration(c) => {
                        println!(
                            "  configuration: machine {:?}, capabilities {:?}, uuid {}",
                            c.machine,
                            c.capabilities,
                            c.uuid.is_some()
                        );
                        "configuration"
                    }
                    Event::RamStart { .. } => "ram START",
                    Event::RamPart { .. } => "ram PART",
                    Event::RamEnd { .. } => "ram END",
                    Event::MemSize { blocks } => {
                        for b in blocks {
                            println!("  block {:<28} {:>12} bytes", b.idstr, b.used_length);
                        }
                        "MEM_SIZE"
                    }
                    Event::Zero { .. } => "ZERO records",
                    Event::Page { .. } => "PAGE records",
                    Event::Flush => "MULTIFD_FLUSH",
                    Event::Eos => "EOS",
                    Event::Footer { .. } => "footers",
                    Event::Command(c) => {
                        println!("  command {c:?}");
                        "commands"
                    }
                    Event::DeviceTail => {
                        let tail = &bytes[pos..];
                        println!("  device-state tail: {} bytes", tail.len());
                        if let Ok(Some(json)) = check_tail(tail) {
                            vmdesc_summary(json);
                        }
                        *counts.entry("device tail").or_default() += 1;
                        break;
                    }
                    Event::Eof => "EOF",
                    Event::VmDesc { json } => {
                        vmdesc_summary(json);
                        "vmdesc"
                    }
                };
                *counts.entry(key).or_default() += 1;
                if pos == bytes.len() {
                    break;
                }
            }
        }
    }
    for (k, v) in counts {
        println!("  {k}: {v}");
    }
    Ok(())
}

fn multifd_channel(bytes: &[u8]) -> Result<()> {
    let init = InitPacket::decode(bytes).context("initial packet")?;
    println!(
        "multifd channel capture: channel id {}, uuid {}",
        init.id,
        multifd::format_uuid(&init.uuid)
    );
    let mut pos = INIT_PACKET_SIZE;
    let (mut packets, mut syncs, mut normal, mut zero, mut payload) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut methods = BTreeMap::new();
    let mut blocks = BTreeMap::new();
    while pos + COMMON_HEADER_SIZE <= bytes.len() {
        let common =
            CommonHeader::decode(&bytes[pos..]).with_context(|| format!("packet at byte {pos}"))?;
        match common.kind() {
            PacketKind::DeviceState => {
                let h = DeviceStateHeader::decode(&bytes[pos..])
                    .with_context(|| format!("device state at byte {pos}"))?;
                println!(
                    "  device state for {:?}/{}: {} bytes",
                    h.idstr, h.instance_id, h.next_packet_size
                );
                pos += DEVICE_STATE_HEADER_SIZE + h.next_packet_size as usize;
            }
            PacketKind::Ram => {
                let h = RamPacketHeader::decode(&bytes[pos..])
                    .with_context(|| format!("packet at byte {pos}"))?;
                packets += 1;
                syncs += u64::from(h.is_sync());
                normal += u64::from(h.normal_pages);
                zero += u64::from(h.zero_pages);
                payload += u64::from(h.next_packet_size);
                if h.page_count() > 0 {
                    *methods.entry(h.compression.name()).or_insert(0u64) += 1;
                    *blocks.entry(h.ramblock.clone()).or_insert(0u64) += h.page_count() as u64;
                }
                pos += RAM_PACKET_HEADER_SIZE + h.next_packet_size as usize;
            }
        }
    }
    println!(
        "  packets: {packets} ({syncs} SYNC), pages: {normal} data + {zero} zero, payload {payload} bytes"
    );
    println!("  methods: {methods:?}");
    println!("  pages per block: {blocks:?}");
    if pos != bytes.len() {
        println!("  (capture ends inside a packet at byte {pos})");
    }
    Ok(())
}
