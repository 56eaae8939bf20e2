//! Checking the end of the opaque device-state tail.
//!
//! The FULL device sections are not self-describing, so the tail cannot be
//! walked forward. It is checked from its end instead: JSON contains no NUL
//! byte, so a vmdesc trailer must start within the six bytes that end at the
//! last NUL of the tail (the EOF byte or a NUL of the length field).

use super::{MAX_VMDESC_LEN, element};
use crate::WireError;

/// Size of the EOF byte plus the vmdesc type byte and length.
const EOF_AND_VMDESC_HEADER: usize = 6;

/// Checks an opaque tail (everything after the ram END footer): it must end
/// with EOF (`0x00`), optionally followed by a well-formed vmdesc (`0x06`, BE
/// u32 length, exactly that many bytes of NUL-free JSON ending the tail).
/// Returns the vmdesc JSON, if any.
///
/// This checks only the end of the tail; the device sections before it are
/// not parsed.
pub fn check_tail(tail: &[u8]) -> Result<Option<&[u8]>, WireError> {
    let Some(last_nul) = tail.iter().rposition(|&b| b == 0) else {
        return Err(WireError::BadTail {
            reason: "no EOF byte",
        });
    };
    if last_nul + 1 == tail.len() {
        return Ok(None);
    }
    let first = last_nul.saturating_sub(EOF_AND_VMDESC_HEADER - 1);
    for eof_at in first..=last_nul {
        let Some(head) = tail.get(eof_at..eof_at + EOF_AND_VMDESC_HEADER) else {
            break;
        };
        if head[0] != element::EOF || head[1] != element::VMDESCRIPTION {
            continue;
        }
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
        let json = &tail[eof_at + EOF_AND_VMDESC_HEADER..];
        if json.len() != len as usize {
            continue;
        }
        if len > MAX_VMDESC_LEN {
            return Err(WireError::InvalidField {
                field: "vmdesc length",
                value: len.into(),
                reason: "more than 16 MiB",
            });
        }
        return Ok(Some(json));
    }
    Err(WireError::BadTail {
        reason: "does not end with EOF or with EOF and a vmdesc",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_vmdesc(devices: &[u8], json: &[u8]) -> Vec<u8> {
        let mut t = devices.to_vec();
        t.push(0);
        t.push(6);
        t.extend_from_slice(&(json.len() as u32).to_be_bytes());
        t.extend_from_slice(json);
        t
    }

    #[test]
    fn eof_alone() {
        assert_eq!(check_tail(&[0]), Ok(None));
        assert_eq!(
            check_tail(&[4, 0, 0, 0, 0, 5, b't', 0x7e, 0, 0, 0, 0, 0]),
            Ok(None)
        );
    }

    #[test]
    fn eof_and_vmdesc() {
        let json = br#"{"page_size": 4096, "devices": []}"#;
        let t = with_vmdesc(&[4, 0, 0, 0, 0, 0x7e, 0, 0, 0, 0], json);
        assert_eq!(check_tail(&t), Ok(Some(&json[..])));
        // NULs inside the length field, and no device state before EOF.
        let big = vec![b' '; 0x0001_0203];
        let t = with_vmdesc(&[], &big);
        assert_eq!(check_tail(&t).unwrap().map(<[u8]>::len), Some(big.len()));
        let t = with_vmdesc(&[], b"x");
        assert_eq!(check_tail(&t), Ok(Some(&b"x"[..])));
    }

    #[test]
    fn rejections() {
        assert!(matches!(check_tail(&[]), Err(WireError::BadTail { .. })));
        assert!(matches!(
            check_tail(&[4, 1, 2]),
            Err(WireError::BadTail { .. })
        ));
        let json = b"{}";
        let mut t = with_vmdesc(&[4, 0, 0], json);
        t.push(b'}');
        assert!(
            matches!(check_tail(&t), Err(WireError::BadTail { .. })),
            "length mismatch"
        );
        let mut t = with_vmdesc(&[4, 0, 0], json);
        t.pop();
        assert!(
            matches!(check_tail(&t), Err(WireError::BadTail { .. })),
            "short json"
        );
        let mut t = with_vmdesc(&[4, 0, 0], json);
        let n = t.len();
        t[n - 8] = 1;
        assert!(
            matches!(check_tail(&t), Err(WireError::BadTail { .. })),
            "no EOF before vmdesc"
        );
        t[n - 8] = 0;
        t[n - 7] = 5;
        assert!(
            matches!(check_tail(&t), Err(WireError::BadTail { .. })),
            "not a vmdesc"
        );
        let t = with_vmdesc(&[], &vec![b' '; (MAX_VMDESC_LEN + 1) as usize]);
        assert!(matches!(
            check_tail(&t),
            Err(WireError::InvalidField { .. })
        ));
    }
}
