//! Encoders of main-stream elements and ram records.
//!
//! Each function appends one item to `out`. Functions that can fail check
//! everything before writing, so on error `out` is unchanged. Names (section
//! idstrs, RAM block ids, machine type, capabilities) must be 1 to 255 bytes.

use std::collections::HashSet;

use super::config::{SUB_CAPABILITIES, SUB_TARGET_PAGE_BITS, SUB_UUID, SUBSECTION_VERSION};
use super::{
    Command, Configuration, MAX_CAPABILITIES, MAX_RAM_BLOCKS, MAX_VMDESC_LEN, QEVM_MAGIC,
    RamBlockInfo, STREAM_VERSION, element, ram_flags as f,
};
use crate::{PAGE_SIZE, WireError};

/// Checks a name written as a counted string (or the machine type).
fn check_name(what: &'static str, name: &str) -> Result<(), WireError> {
    let reason = match name.len() {
        0 => "empty",
        1..=255 => return Ok(()),
        _ => "longer than 255 bytes",
    };
    Err(WireError::BadName { what, reason })
}

/// Appends a counted string; the name must have been checked.
fn put_counted(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn check_offset(offset: u64) -> Result<(), WireError> {
    if offset & f::MASK != 0 {
        return Err(WireError::InvalidField {
            field: "page offset",
            value: offset,
            reason: "not page-aligned",
        });
    }
    Ok(())
}

/// The file header: `"QEVM"`, version 3.
pub fn header(out: &mut Vec<u8>) {
    put_u32(out, QEVM_MAGIC);
    put_u32(out, STREAM_VERSION);
}

/// The configuration section, with each subsection only when its field is
/// set (capabilities: when the list is not empty), in QEMU's order:
/// target page bits, capabilities, UUID.
pub fn configuration(out: &mut Vec<u8>, cfg: &Configuration) -> Result<(), WireError> {
    check_name("machine type", &cfg.machine)?;
    if cfg.capabilities.len() > MAX_CAPABILITIES {
        return Err(WireError::InvalidField {
            field: "capability count",
            value: cfg.capabilities.len() as u64,
            reason: "more than 64 capabilities",
        });
    }
    for cap in &cfg.capabilities {
        check_name("capability", cap)?;
    }
    out.push(element::CONFIGURATION);
    put_u32(out, cfg.machine.len() as u32);
    out.extend_from_slice(cfg.machine.as_bytes());
    let subsection = |out: &mut Vec<u8>, name: &str| {
        out.push(element::SUBSECTION);
        put_counted(out, name);
        put_u32(out, SUBSECTION_VERSION);
    };
    if let Some(bits) = cfg.target_page_bits {
        subsection(out, SUB_TARGET_PAGE_BITS);
        put_u32(out, bits);
    }
    if !cfg.capabilities.is_empty() {
        subsection(out, SUB_CAPABILITIES);
        put_u32(out, cfg.capabilities.len() as u32);
        for cap in &cfg.capabilities {
            put_counted(out, cap);
        }
    }
    if let Some(uuid) = &cfg.uuid {
        subsection(out, SUB_UUID);
        out.extend_from_slice(uuid);
    }
    Ok(())
}

fn section_header(
    out: &mut Vec<u8>,
    ty: u8,
    section_id: u32,
    idstr: &str,
    instance_id: u32,
    version_id: u32,
) -> Result<(), WireError> {
    check_name("section idstr", idstr)?;
    out.push(ty);
    put_u32(out, section_id);
    put_counted(out, idstr);
    put_u32(out, instance_id);
    put_u32(out, version_id);
    Ok(())
}

/// The header of a live section's START chunk.
pub fn section_start(
    out: &mut Vec<u8>,
    section_id: u32,
    idstr: &str,
    instance_id: u32,
    version_id: u32,
) -> Result<(), WireError> {
    section_header(
        out,
        element::START,
        section_id,
        idstr,
        instance_id,
        version_id,
    )
}

/// The header of a FULL (non-iterable device) section.
pub fn section_full(
    out: &mut Vec<u8>,
    section_id: u32,
    idstr: &str,
    instance_id: u32,
    version_id: u32,
) -> Result<(), WireError> {
    section_header(
        out,
        element::FULL,
        section_id,
        idstr,
        instance_id,
        version_id,
    )
}

/// The header of a PART chunk.
pub fn section_part(out: &mut Vec<u8>, section_id: u32) {
    out.push(element::PART);
    put_u32(out, section_id);
}

/// The header of an END chunk.
pub fn section_end(out: &mut Vec<u8>, section_id: u32) {
    out.push(element::END);
    put_u32(out, section_id);
}

/// The footer closing a section.
pub fn section_footer(out: &mut Vec<u8>, section_id: u32) {
    out.push(element::FOOTER);
    put_u32(out, section_id);
}

/// The `MEM_SIZE` record: the total of the lengths, then each block.
///
/// Lengths must be non-zero and page-aligned, names distinct, at most
/// [`MAX_RAM_BLOCKS`] blocks.
pub fn mem_size(out: &mut Vec<u8>, blocks: &[RamBlockInfo]) -> Result<(), WireError> {
    if blocks.len() > MAX_RAM_BLOCKS {
        return Err(WireError::InvalidField {
            field: "RAM block count",
            value: blocks.len() as u64,
            reason: "more than 1024 RAM blocks",
        });
    }
    let mut total = 0u64;
    let mut names = HashSet::new();
    for b in blocks {
        check_name("MEM_SIZE block", &b.idstr)?;
        if b.used_length == 0 || b.used_length & f::MASK != 0 {
            return Err(WireError::InvalidField {
                field: "RAM block used_length",
                value: b.used_length,
                reason: "zero or not page-aligned",
            });
        }
        total = total
            .checked_add(b.used_length)
            .ok_or(WireError::MemSizeMismatch {
                total: u64::MAX,
                listed: u64::MAX,
            })?;
        if !names.insert(b.idstr.as_str()) {
            return Err(WireError::DuplicateRamBlock {
                name: b.idstr.clone(),
            });
        }
    }
    put_u64(out, total | f::MEM_SIZE);
    for b in blocks {
        put_counted(out, &b.idstr);
        put_u64(out, b.used_length);
    }
    Ok(())
}

/// A `MULTIFD_FLUSH` record.
pub fn flush(out: &mut Vec<u8>) {
    put_u64(out, f::MULTIFD_FLUSH);
}

/// An `EOS` record.
pub fn eos(out: &mut Vec<u8>) {
    put_u64(out, f::EOS);
}

/// Header of a ZERO/PAGE record: `None` writes CONTINUE and no name.
fn page_record_header(
    out: &mut Vec<u8>,
    kind: u64,
    block: Option<&str>,
    offset: u64,
) -> Result<(), WireError> {
    check_offset(offset)?;
    if let Some(name) = block {
        check_name("RAM record block", name)?;
    }
    match block {
        None => put_u64(out, offset | kind | f::CONTINUE),
        Some(name) => {
            put_u64(out, offset | kind);
            put_counted(out, name);
        }
    }
    Ok(())
}

/// A legacy ZERO record (fill byte 0). `block: None` means CONTINUE (same
/// block as the previous ZERO/PAGE record). `offset` must be page-aligned.
pub fn zero_page(out: &mut Vec<u8>, block: Option<&str>, offset: u64) -> Result<(), WireError> {
    page_record_header(out, f::ZERO, block, offset)?;
    out.push(0);
    Ok(())
}

/// A PAGE record with its 4096 bytes. `block: None` means CONTINUE.
pub fn page(
    out: &mut Vec<u8>,
    block: Option<&str>,
    offset: u64,
    data: &[u8],
) -> Result<(), WireError> {
    if data.len() != PAGE_SIZE {
        return Err(WireError::InvalidField {
            field: "page data length",
            value: data.len() as u64,
            reason: "a page is 4096 bytes",
        });
    }
    page_record_header(out, f::PAGE, block, offset)?;
    out.extend_from_slice(data);
    Ok(())
}

/// A command.
pub fn command(out: &mut Vec<u8>, cmd: Command) {
    out.push(element::COMMAND);
    put_u16(out, cmd.code());
    match cmd {
        Command::Ping(value) => {
            put_u16(out, 4);
            put_u32(out, value);
        }
        Command::OpenReturnPath | Command::SwitchoverStart => put_u16(out, 0),
    }
}

/// EOF: the end of the device state.
pub fn eof(out: &mut Vec<u8>) {
    out.push(element::EOF);
}

/// The vmdesc trailer (write it right after [`eof`]).
pub fn vmdesc(out: &mut Vec<u8>, json: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(json.len())
        .ok()
        .filter(|&len| len <= MAX_VMDESC_LEN)
        .ok_or(WireError::InvalidField {
            field: "vmdesc length",
            value: json.len() as u64,
            reason: "more than 16 MiB",
        })?;
    out.push(element::VMDESCRIPTION);
    put_u32(out, len);
    out.extend_from_slice(json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_leave_out_unchanged() {
        let mut out = vec![1, 2, 3];
        let long = "x".repeat(256);
        assert!(section_start(&mut out, 1, "", 0, 4).is_err());
        assert!(section_full(&mut out, 1, &long, 0, 4).is_err());
        assert!(zero_page(&mut out, Some("m0"), 0x1001).is_err());
        assert!(zero_page(&mut out, Some(""), 0x1000).is_err());
        assert!(page(&mut out, None, 0, &[0; 4095]).is_err());
        let dup = RamBlockInfo {
            idstr: "m0".into(),
            used_length: 0x1000,
        };
        assert!(mem_size(&mut out, &[dup.clone(), dup.clone()]).is_err());
        let odd = RamBlockInfo {
            used_length: 0x1800,
            ..dup
        };
        assert!(mem_size(&mut out, &[odd]).is_err());
        let cfg = Configuration {
            machine: "none".into(),
            capabilities: vec![String::new()],
            ..Configuration::default()
        };
        assert!(configuration(&mut out, &cfg).is_err());
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn captured_encodings() {
        let mut out = Vec::new();
        zero_page(&mut out, Some("m0"), 0x1000).unwrap();
        zero_page(&mut out, None, 0x5000).unwrap();
        assert_eq!(
            out,
            [
                0, 0, 0, 0, 0, 0, 0x10, 0x02, 2, b'm', b'0', 0, 0, 0, 0, 0, 0, 0, 0x50, 0x22, 0
            ]
        );
        let mut out = Vec::new();
        command(&mut out, Command::OpenReturnPath);
        command(&mut out, Command::Ping(1));
        command(&mut out, Command::SwitchoverStart);
        assert_eq!(
            out,
            [8, 0, 1, 0, 0, 8, 0, 2, 0, 4, 0, 0, 0, 1, 8, 0, 11, 0, 0]
        );
        let mut out = Vec::new();
        let cfg = Configuration {
            machine: "none".into(),
            uuid: Some([0x11; 16]),
            capabilities: vec!["mapped-ram".into()],
            target_page_bits: None,
        };
        configuration(&mut out, &cfg).unwrap();
        let mut want = b"\x07\0\0\0\x04none".to_vec();
        want.extend_from_slice(
            b"\x05\x1aconfiguration/capabilities\0\0\0\x01\0\0\0\x01\x0amapped-ram",
        );
        want.extend_from_slice(b"\x05\x12configuration/uuid\0\0\0\x01");
        want.extend_from_slice(&[0x11; 16]);
        assert_eq!(out, want);
    }
}
