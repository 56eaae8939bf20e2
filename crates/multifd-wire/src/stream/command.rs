//! Decoding of commands (`0x08`, BE u16 command, BE u16 length, body).

use super::Command;
use super::cursor::{Cursor, Step};
use crate::WireError;

/// Command numbers.
pub(super) mod code {
    pub(crate) const OPEN_RETURN_PATH: u16 = 1;
    pub(crate) const PING: u16 = 2;
    pub(crate) const SWITCHOVER_START: u16 = 11;
}

impl Command {
    /// The command number on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Self::OpenReturnPath => code::OPEN_RETURN_PATH,
            Self::Ping(_) => code::PING,
            Self::SwitchoverStart => code::SWITCHOVER_START,
        }
    }
}

/// QEMU's name of a command this implementation recognises but refuses.
fn unsupported_name(cmd: u16) -> Option<&'static str> {
    Some(match cmd {
        3 => "POSTCOPY_ADVISE",
        4 => "POSTCOPY_LISTEN",
        5 => "POSTCOPY_RUN",
        6 => "POSTCOPY_RAM_DISCARD",
        7 => "PACKAGED",
        8 => "ENABLE_COLO",
        9 => "POSTCOPY_RESUME",
        10 => "RECV_BITMAP",
        _ => return None,
    })
}

/// Decodes a command after its `0x08` type byte.
pub(super) fn decode(c: &mut Cursor<'_>) -> Step<Command> {
    let cmd = c.u16()?;
    let len = c.u16()?;
    let want = match cmd {
        code::OPEN_RETURN_PATH | code::SWITCHOVER_START => 0,
        code::PING => 4,
        _ => {
            return Err(match unsupported_name(cmd) {
                Some(name) => WireError::UnsupportedCommand { command: cmd, name },
                None => WireError::UnknownCommand(cmd),
            }
            .into());
        }
    };
    if len != want {
        return Err(WireError::InvalidField {
            field: "command length",
            value: len.into(),
            reason: "not the fixed length of this command",
        }
        .into());
    }
    Ok(match cmd {
        code::OPEN_RETURN_PATH => Command::OpenReturnPath,
        code::PING => Command::Ping(c.u32()?),
        _ => Command::SwitchoverStart,
    })
}

#[cfg(test)]
mod tests {
    use super::super::cursor::Halt;
    use super::*;

    fn dec(bytes: &[u8]) -> Step<Command> {
        decode(&mut Cursor::new(bytes))
    }

    #[test]
    fn captured_commands() {
        assert_eq!(dec(&[0, 1, 0, 0]).unwrap(), Command::OpenReturnPath);
        assert_eq!(dec(&[0, 2, 0, 4, 0, 0, 0, 1]).unwrap(), Command::Ping(1));
        assert_eq!(dec(&[0, 11, 0, 0]).unwrap(), Command::SwitchoverStart);
        assert!(matches!(dec(&[0, 2, 0, 4, 0]), Err(Halt::NeedMore(8))));
    }

    #[test]
    fn rejections() {
        assert!(matches!(
            dec(&[0, 3, 0, 0]),
            Err(Halt::Invalid(WireError::UnsupportedCommand {
                command: 3,
                name: "POSTCOPY_ADVISE"
            }))
        ));
        assert!(matches!(
            dec(&[0, 12, 0, 0]),
            Err(Halt::Invalid(WireError::UnknownCommand(12)))
        ));
        assert!(matches!(
            dec(&[0, 0, 0, 0]),
            Err(Halt::Invalid(WireError::UnknownCommand(0)))
        ));
        assert!(matches!(
            dec(&[0, 11, 0, 4]),
            Err(Halt::Invalid(WireError::InvalidField {
                field: "command length",
                ..
            }))
        ));
    }
}
