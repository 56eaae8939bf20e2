//! Opaque device state in the main stream: one QEMU-style FULL section of
//! our own, so that a stream carrying it keeps QEMU's grammar and the
//! receiver keeps it in the tail after the `ram` END section like any
//! device section.
//!
//! ```text
//! 0x04 FULL | section id u32 | idstr len u8 | "multifd/device-state"
//!           | instance id u32 = 0 | version id u32 = 1
//! body:       length u32 | the caller's bytes
//! 0x7e FOOTER | section id u32
//! ```
//! All integers big-endian, as every field of QEMU's stream. QEMU itself
//! does not know the idstr (it would fail with "unknown savevm section"),
//! which is right: these bytes are for a VMM of our own. A tail recorded
//! from QEMU starts with QEMU's own sections and has no such section.

use multifd_wire::WireError;
use multifd_wire::stream::{element, encode};

use crate::error::{Endpoint, Error, Result};

/// The idstr of the section carrying opaque device state.
pub const DEVICE_STATE_IDSTR: &str = "multifd/device-state";
const VERSION: u32 = 1;

/// Encodes `state` as the device-state section (section id `section_id`),
/// ready to be returned from
/// [`SourceVm::device_state`](crate::SourceVm::device_state).
pub fn device_state_section(section_id: u32, state: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(state.len())
        .map_err(|_| Error::Config(format!("device state of {} bytes", state.len())))?;
    let mut out = Vec::with_capacity(state.len() + 64);
    encode::section_full(&mut out, section_id, DEVICE_STATE_IDSTR, 0, VERSION).map_err(
        |source| Error::Encode {
            endpoint: Endpoint::Main,
            source,
        },
    )?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(state);
    encode::section_footer(&mut out, section_id);
    Ok(out)
}

fn bad(reason: &'static str) -> Error {
    Error::Wire {
        endpoint: Endpoint::Main,
        source: WireError::BadTail { reason },
    }
}

fn take<'t>(at: &mut &'t [u8], n: usize) -> Option<&'t [u8]> {
    if at.len() < n {
        return None;
    }
    let (head, rest) = at.split_at(n);
    *at = rest;
    Some(head)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The opaque device state at the start of `tail` (the main-stream bytes
/// after the `ram` END section), or `None` when the tail does not start
/// with our section (a QEMU tail, or a source that sent none).
pub(crate) fn find_device_state(tail: &[u8]) -> Result<Option<&[u8]>> {
    let mut at = tail;
    let Some(&[kind]) = take(&mut at, 1) else {
        return Ok(None);
    };
    if kind != element::FULL {
        return Ok(None);
    }
    let Some(head) = take(&mut at, 5) else {
        return Ok(None);
    };
    let section_id = be32(head);
    let idlen = usize::from(head[4]);
    match take(&mut at, idlen) {
        Some(id) if id == DEVICE_STATE_IDSTR.as_bytes() => {}
        _ => return Ok(None),
    }
    let ids = take(&mut at, 8).ok_or(bad("device-state section cut short"))?;
    if be32(&ids[4..]) != VERSION {
        return Err(bad("device-state section of an unknown version"));
    }
    let len = take(&mut at, 4).ok_or(bad("device-state section cut short"))?;
    let state = take(&mut at, be32(len) as usize).ok_or(bad("device state cut short"))?;
    let footer = take(&mut at, 5).ok_or(bad("device-state section has no footer"))?;
    if footer[0] != element::FOOTER || be32(&footer[1..]) != section_id {
        return Err(bad("device-state section has a wrong footer"));
    }
    Ok(Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_tails() {
        let mut tail = device_state_section(7, b"regs").unwrap();
        tail.push(element::EOF);
        assert_eq!(find_device_state(&tail).unwrap(), Some(&b"regs"[..]));
        // An empty state is still a state.
        let empty = device_state_section(2, b"").unwrap();
        assert_eq!(find_device_state(&empty).unwrap(), Some(&b""[..]));
        // EOF alone, and a QEMU section first: none of ours.
        assert_eq!(find_device_state(&[0]).unwrap(), None);
        let mut qemu = Vec::new();
        encode::section_full(&mut qemu, 3, "timer", 0, 2).unwrap();
        qemu.extend_from_slice(&[0; 16]);
        assert_eq!(find_device_state(&qemu).unwrap(), None);
        // Ours, damaged.
        let full = device_state_section(7, b"regs").unwrap();
        for cut in [full.len() - 1, full.len() - 6, 30] {
            assert!(find_device_state(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong = full.clone();
        *wrong.last_mut().unwrap() = 8;
        assert!(find_device_state(&wrong).is_err());
    }
}
