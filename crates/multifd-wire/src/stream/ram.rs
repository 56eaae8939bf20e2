//! Decoding of the records inside a ram section (START/PART/END payload).

use std::collections::HashSet;

use super::cursor::{Cursor, Step};
use super::{MAX_RAM_BLOCKS, RamBlockInfo, ram_flags as f};
use crate::{PAGE_SIZE, WireError};

/// Every bit that selects a record type (exactly one must be set).
const TYPE_MASK: u64 = f::ZERO
    | f::MEM_SIZE
    | f::PAGE
    | f::EOS
    | f::XBZRLE
    | f::HOOK
    | f::COMPRESS_PAGE
    | f::MULTIFD_FLUSH;

/// One record, as found on the wire (CONTINUE not resolved yet).
#[derive(Debug, PartialEq)]
pub(super) enum Record<'a> {
    /// The RAM block list.
    MemSize(Vec<RamBlockInfo>),
    /// A zero page; `block` is `None` for CONTINUE.
    Zero { block: Option<&'a str>, offset: u64 },
    /// A raw page; `block` is `None` for CONTINUE.
    Page {
        block: Option<&'a str>,
        offset: u64,
        data: &'a [u8],
    },
    /// A multifd sync point.
    Flush,
    /// End of the section's records.
    Eos,
}

/// What the section reader knows that decides whether a record is allowed.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordContext {
    /// This is the first record of the ram START section (must be MEM_SIZE).
    pub(super) first_of_start: bool,
    /// A validated capability announced in the configuration that would add
    /// fields to the block list.
    pub(super) layout_capability: Option<&'static str>,
}

/// Decodes one record.
pub(super) fn decode<'a>(c: &mut Cursor<'a>, ctx: RecordContext) -> Step<Record<'a>> {
    let header = c.u64()?;
    let flags = header & f::MASK;
    let addr = header & !f::MASK;
    if flags & !(TYPE_MASK | f::CONTINUE) != 0 {
        return Err(WireError::BadFlags {
            what: "RAM record (unknown flag bits)",
            flags,
        }
        .into());
    }
    let kind = flags & TYPE_MASK;
    if kind.count_ones() != 1 {
        return Err(WireError::BadFlags {
            what: "RAM record (not exactly one record type)",
            flags,
        }
        .into());
    }
    let unsupported = |name| Err(WireError::UnsupportedRecord { name, flags }.into());
    match kind {
        f::XBZRLE => return unsupported("XBZRLE"),
        f::HOOK => return unsupported("HOOK (RDMA)"),
        f::COMPRESS_PAGE => return unsupported("COMPRESS_PAGE (removed in QEMU 9.1)"),
        _ => {}
    }
    let cont = flags & f::CONTINUE != 0;
    if cont && kind != f::ZERO && kind != f::PAGE {
        return Err(WireError::BadFlags {
            what: "RAM record (CONTINUE on a record without a block)",
            flags,
        }
        .into());
    }
    if ctx.first_of_start != (kind == f::MEM_SIZE) {
        return Err(WireError::BadFlags {
            what: "RAM record (MEM_SIZE must be exactly the first record of the ram START)",
            flags,
        }
        .into());
    }
    if (kind == f::EOS || kind == f::MULTIFD_FLUSH) && addr != 0 {
        return Err(WireError::InvalidField {
            field: "RAM record header",
            value: header,
            reason: "EOS and MULTIFD_FLUSH carry no offset",
        }
        .into());
    }
    Ok(match kind {
        f::MEM_SIZE => {
            if let Some(name) = ctx.layout_capability {
                return Err(WireError::UnsupportedCapability {
                    name: name.to_owned(),
                }
                .into());
            }
            Record::MemSize(block_list(c, addr)?)
        }
        f::EOS => Record::Eos,
        f::MULTIFD_FLUSH => Record::Flush,
        f::ZERO => {
            let block = block_name(c, cont)?;
            let fill = c.u8()?;
            if fill != 0 {
                return Err(WireError::NonZeroFill { offset: addr, fill }.into());
            }
            Record::Zero {
                block,
                offset: addr,
            }
        }
        _ => {
            let block = block_name(c, cont)?;
            let data = c.take(PAGE_SIZE)?;
            Record::Page {
                block,
                offset: addr,
                data,
            }
        }
    })
}

/// The block name of a ZERO/PAGE record, `None` with CONTINUE.
fn block_name<'a>(c: &mut Cursor<'a>, cont: bool) -> Step<Option<&'a str>> {
    if cont {
        Ok(None)
    } else {
        Ok(Some(c.counted_name("RAM record block")?))
    }
}

/// The `MEM_SIZE` block list: entries until their lengths add up to `total`.
fn block_list(c: &mut Cursor<'_>, total: u64) -> Step<Vec<RamBlockInfo>> {
    let mut blocks = Vec::new();
    let mut names = HashSet::new();
    let mut listed = 0u64;
    while listed < total {
        if blocks.len() == MAX_RAM_BLOCKS {
            return Err(WireError::InvalidField {
                field: "RAM block count",
                value: blocks.len() as u64 + 1,
                reason: "more than 1024 RAM blocks",
            }
            .into());
        }
        let idstr = c.counted_name("MEM_SIZE block")?;
        let used_length = c.u64()?;
        if used_length == 0 || used_length & f::MASK != 0 {
            return Err(WireError::InvalidField {
                field: "RAM block used_length",
                value: used_length,
                reason: "zero or not page-aligned",
            }
            .into());
        }
        listed = match listed.checked_add(used_length) {
            Some(sum) if sum <= total => sum,
            sum => {
                return Err(WireError::MemSizeMismatch {
                    total,
                    listed: sum.unwrap_or(u64::MAX),
                }
                .into());
            }
        };
        if !names.insert(idstr) {
            return Err(WireError::DuplicateRamBlock {
                name: idstr.to_owned(),
            }
            .into());
        }
        blocks.push(RamBlockInfo {
            idstr: idstr.to_owned(),
            used_length,
        });
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::super::cursor::Halt;
    use super::*;

    const LATER: RecordContext = RecordContext {
        first_of_start: false,
        layout_capability: None,
    };
    const FIRST: RecordContext = RecordContext {
        first_of_start: true,
        layout_capability: None,
    };

    fn dec(bytes: &[u8], ctx: RecordContext) -> Step<Record<'_>> {
        decode(&mut Cursor::new(bytes), ctx)
    }

    fn invalid(r: Step<Record<'_>>) -> WireError {
        match r {
            Err(Halt::Invalid(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn legacy_zero_records_from_capture() {
        // `zero-page-detection=legacy`: page 0x1000 of m0, then page 0x5000
        // of the same block with CONTINUE.
        let named = [0, 0, 0, 0, 0, 0, 0x10, 0x02, 2, b'm', b'0', 0];
        assert_eq!(
            dec(&named, LATER).unwrap(),
            Record::Zero {
                block: Some("m0"),
                offset: 0x1000
            }
        );
        let cont = [0, 0, 0, 0, 0, 0, 0x50, 0x22, 0];
        assert_eq!(
            dec(&cont, LATER).unwrap(),
            Record::Zero {
                block: None,
                offset: 0x5000
            }
        );
        let mut bad_fill = named;
        bad_fill[11] = 0xAA;
        assert_eq!(
            invalid(dec(&bad_fill, LATER)),
            WireError::NonZeroFill {
                offset: 0x1000,
                fill: 0xAA
            }
        );
    }

    #[test]
    fn mem_size_q35_capture() {
        let mut b = 0x1008_2000u64.to_be_bytes().to_vec();
        b[7] |= 0x04;
        for (name, len) in [
            ("m0", 0x1000_0000u64),
            ("/rom@etc/acpi/tables", 0x20000),
            ("pc.bios", 0x40000),
            ("pc.rom", 0x20000),
            ("/rom@etc/table-loader", 0x1000),
            ("/rom@etc/acpi/rsdp", 0x1000),
        ] {
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&len.to_be_bytes());
        }
        let Record::MemSize(blocks) = dec(&b, FIRST).unwrap() else {
            panic!("not MEM_SIZE")
        };
        assert_eq!(blocks.len(), 6);
        assert_eq!(blocks[5].idstr, "/rom@etc/acpi/rsdp");
        assert!(matches!(dec(&b[..b.len() - 1], FIRST), Err(Halt::NeedMore(n)) if n == b.len()));
        // The total says there is more to come.
        let mut short = b.clone();
        short[5] = 0x09;
        assert!(matches!(dec(&short, FIRST), Err(Halt::NeedMore(_))));
        // The lengths overshoot the total.
        let mut over = b.clone();
        over[5] = 0x07;
        assert!(matches!(
            invalid(dec(&over, FIRST)),
            WireError::MemSizeMismatch { .. }
        ));
        let ctx = RecordContext {
            first_of_start: true,
            layout_capability: Some("mapped-ram"),
        };
        assert!(matches!(
            invalid(dec(&b, ctx)),
            WireError::UnsupportedCapability { .. }
        ));
        assert!(matches!(
            invalid(dec(&b, LATER)),
            WireError::BadFlags { .. }
        ));
    }

    #[test]
    fn mem_size_rejects_bad_lengths_and_duplicates() {
        let mut dup = 0x2000u64.to_be_bytes().to_vec();
        dup[7] |= 0x04;
        dup.extend_from_slice(b"\x02m0\0\0\0\0\0\0\x10\0\x02m0\0\0\0\0\0\0\x10\0");
        assert!(matches!(
            invalid(dec(&dup, FIRST)),
            WireError::DuplicateRamBlock { .. }
        ));
        let mut odd = 0x2000u64.to_be_bytes().to_vec();
        odd[7] |= 0x04;
        odd.extend_from_slice(b"\x02m0\0\0\0\0\0\0\x10\x01");
        assert!(matches!(
            invalid(dec(&odd, FIRST)),
            WireError::InvalidField { .. }
        ));
    }

    #[test]
    fn flag_rules() {
        let rec = |v: u64| v.to_be_bytes();
        assert_eq!(dec(&rec(0x10), LATER).unwrap(), Record::Eos);
        assert_eq!(dec(&rec(0x200), LATER).unwrap(), Record::Flush);
        assert!(matches!(
            invalid(dec(&rec(0x40), LATER)),
            WireError::UnsupportedRecord { name: "XBZRLE", .. }
        ));
        assert!(matches!(
            invalid(dec(&rec(0x80), LATER)),
            WireError::UnsupportedRecord { .. }
        ));
        assert!(matches!(
            invalid(dec(&rec(0x100), LATER)),
            WireError::UnsupportedRecord { .. }
        ));
        for v in [
            0x0, 0x1, 0x400, 0x800, 0x12, 0x0A, 0x210, 0x30, 0x220, 0x1010, 0x1200,
        ] {
            assert!(dec(&rec(v), LATER).is_err(), "{v:#x} accepted");
        }
        assert!(matches!(
            invalid(dec(&rec(0x10), FIRST)),
            WireError::BadFlags { .. }
        ));
        let mut page = rec(0x3028).to_vec();
        page.extend_from_slice(&[7; 4096]);
        assert_eq!(
            dec(&page, LATER).unwrap(),
            Record::Page {
                block: None,
                offset: 0x3000,
                data: &[7; 4096]
            }
        );
        assert!(matches!(
            dec(&page[..4103], LATER),
            Err(Halt::NeedMore(4104))
        ));
    }
}
