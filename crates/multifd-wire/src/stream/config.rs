//! Decoding of the configuration section (`0x07`) and its subsections.

use super::cursor::{Cursor, Step, name_from_bytes};
use super::{Configuration, MAX_CAPABILITIES, MAX_MACHINE_NAME_LEN, element, misplaced};
use crate::WireError;

/// Subsection carrying the target page size, as a number of bits.
pub(super) const SUB_TARGET_PAGE_BITS: &str = "configuration/target-page-bits";
/// Subsection listing the validated capabilities that are on.
pub(super) const SUB_CAPABILITIES: &str = "configuration/capabilities";
/// Subsection carrying the VM UUID.
pub(super) const SUB_UUID: &str = "configuration/uuid";
/// Version of every configuration subsection.
pub(super) const SUBSECTION_VERSION: u32 = 1;
/// Prefix that tells a configuration subsection from anything else.
const SUB_PREFIX: &[u8] = b"configuration";
/// Page bits of a 4 KiB-page target.
const TARGET_PAGE_BITS: u32 = 12;

/// Validated capabilities that add fields to the `MEM_SIZE` block list; a
/// stream announcing one of them cannot be decoded by this crate.
pub(super) const LAYOUT_CAPABILITIES: [&str; 2] = ["mapped-ram", "x-ignore-shared"];

/// Decodes the whole configuration element, starting at its type byte.
///
/// Subsections have no terminator, so the element is complete only once the
/// byte after it is known not to start another subsection.
pub(super) fn decode(c: &mut Cursor<'_>) -> Step<Configuration> {
    let ty = c.u8()?;
    if ty != element::CONFIGURATION {
        return Err(misplaced(ty, "where the configuration section must be").into());
    }
    let len = c.u32()?;
    if len == 0 || len as usize > MAX_MACHINE_NAME_LEN {
        return Err(WireError::InvalidField {
            field: "machine type name length",
            value: len.into(),
            reason: "must be 1 to 255 bytes",
        }
        .into());
    }
    let machine = name_from_bytes("machine type", c.take(len as usize)?)?;
    let mut cfg = Configuration {
        machine: machine.to_owned(),
        ..Configuration::default()
    };
    let mut seen_caps = false;
    while c.peek_u8()? == element::SUBSECTION {
        c.u8()?;
        let name = c.counted()?;
        if !name.starts_with(SUB_PREFIX) {
            return Err(misplaced(
                element::SUBSECTION,
                "after the configuration (not one of its subsections)",
            )
            .into());
        }
        let which = match name {
            n if n == SUB_TARGET_PAGE_BITS.as_bytes() => SUB_TARGET_PAGE_BITS,
            n if n == SUB_CAPABILITIES.as_bytes() => SUB_CAPABILITIES,
            n if n == SUB_UUID.as_bytes() => SUB_UUID,
            n => {
                return Err(WireError::UnknownSubsection {
                    name: String::from_utf8_lossy(n).into_owned(),
                }
                .into());
            }
        };
        let version = c.u32()?;
        if version != SUBSECTION_VERSION {
            return Err(WireError::BadVersion {
                what: which,
                found: version,
                expected: SUBSECTION_VERSION,
            }
            .into());
        }
        let duplicate = WireError::DuplicateSubsection { name: which };
        match which {
            SUB_TARGET_PAGE_BITS => {
                if cfg.target_page_bits.is_some() {
                    return Err(duplicate.into());
                }
                let bits = c.u32()?;
                if bits != TARGET_PAGE_BITS {
                    return Err(WireError::InvalidField {
                        field: "target page bits",
                        value: bits.into(),
                        reason: "only 4 KiB target pages (12 bits) are supported",
                    }
                    .into());
                }
                cfg.target_page_bits = Some(bits);
            }
            SUB_CAPABILITIES => {
                if seen_caps {
                    return Err(duplicate.into());
                }
                seen_caps = true;
                let count = c.u32()?;
                if count as usize > MAX_CAPABILITIES {
                    return Err(WireError::InvalidField {
                        field: "capability count",
                        value: count.into(),
                        reason: "more than 64 capabilities",
                    }
                    .into());
                }
                for _ in 0..count {
                    let cap = c.counted_name("capability")?;
                    cfg.capabilities.push(cap.to_owned());
                }
            }
            _ => {
                if cfg.uuid.is_some() {
                    return Err(duplicate.into());
                }
                cfg.uuid = Some(c.array()?);
            }
        }
    }
    Ok(cfg)
}

/// The first capability in `cfg` that changes the `MEM_SIZE` layout.
pub(super) fn layout_capability(cfg: &Configuration) -> Option<&'static str> {
    LAYOUT_CAPABILITIES
        .into_iter()
        .find(|known| cfg.capabilities.iter().any(|c| c == known))
}

#[cfg(test)]
mod tests {
    use super::super::cursor::Halt;
    use super::*;

    fn dec(bytes: &[u8]) -> Step<Configuration> {
        decode(&mut Cursor::new(bytes))
    }

    #[test]
    fn capture_with_capabilities_and_uuid() {
        // From a QEMU 10.0.2 `-M none` file migration with mapped-ram and
        // validate-uuid, followed by the START of "ram".
        let mut b = b"\x07\0\0\0\x04none".to_vec();
        b.extend_from_slice(
            b"\x05\x1aconfiguration/capabilities\0\0\0\x01\0\0\0\x01\x0amapped-ram",
        );
        b.extend_from_slice(b"\x05\x12configuration/uuid\0\0\0\x01");
        b.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0x12, 0x34, 0x56, 0x78]);
        b.extend_from_slice(&[0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56, 0x78]);
        let end = b.len();
        assert!(matches!(dec(&b), Err(Halt::NeedMore(n)) if n == end + 1));
        b.push(element::START);
        let mut c = Cursor::new(&b);
        let cfg = decode(&mut c).unwrap();
        assert_eq!(c.pos(), end);
        assert_eq!(cfg.machine, "none");
        assert_eq!(cfg.capabilities, ["mapped-ram"]);
        assert_eq!(cfg.uuid.unwrap()[..4], [0x12, 0x34, 0x56, 0x78]);
        assert_eq!(layout_capability(&cfg), Some("mapped-ram"));
    }

    #[test]
    fn rejections() {
        let unknown = b"\x07\0\0\0\x04none\x05\x11configuration/foo\0\0\0\x01\x01";
        assert!(matches!(
            dec(unknown),
            Err(Halt::Invalid(WireError::UnknownSubsection { .. }))
        ));
        let bits =
            b"\x07\0\0\0\x04none\x05\x1econfiguration/target-page-bits\0\0\0\x01\0\0\0\x10\x01";
        assert!(matches!(
            dec(bits),
            Err(Halt::Invalid(WireError::InvalidField { .. }))
        ));
        let version = b"\x07\0\0\0\x04none\x05\x12configuration/uuid\0\0\0\x02";
        assert!(matches!(
            dec(version),
            Err(Halt::Invalid(WireError::BadVersion { found: 2, .. }))
        ));
        let other = b"\x07\0\0\0\x04none\x05\x05timer";
        assert!(matches!(
            dec(other),
            Err(Halt::Invalid(WireError::UnexpectedElement {
                element: 5,
                ..
            }))
        ));
        let empty = b"\x07\0\0\0\0\x01";
        assert!(matches!(
            dec(empty),
            Err(Halt::Invalid(WireError::InvalidField { .. }))
        ));
        assert!(matches!(
            dec(b"\x01"),
            Err(Halt::Invalid(WireError::UnexpectedElement {
                element: 1,
                ..
            }))
        ));
        assert!(matches!(
            dec(b"\x42"),
            Err(Halt::Invalid(WireError::UnknownElement(0x42)))
        ));
    }
}
