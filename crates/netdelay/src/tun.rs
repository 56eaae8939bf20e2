//! TUN devices: layer-3 interfaces whose packets are read and written by
//! this process.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// The largest packet a TUN device carries (its MTU is at most 65535).
pub const MAX_PACKET: usize = 65_535;

/// Errors creating a TUN device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// /dev/net/tun could not be opened.
    #[error("opening /dev/net/tun: {0}")]
    Open(std::io::Error),
    /// The name does not fit an interface name.
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    /// TUNSETIFF refused (a device of that name exists, no CAP_NET_ADMIN...).
    #[error("TUNSETIFF {name}: {source}")]
    Create {
        /// The device name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// struct ifreq as TUNSETIFF reads it: the name, then the flags (a short) at
/// the start of the 24-byte union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the TUN device `name` (IFF_TUN | IFF_NO_PI: bare IP packets) in
/// the calling thread's network namespace, non-blocking. The device lives as
/// long as the returned file.
pub fn create(name: &str) -> Result<File, TunError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(TunError::Name(name.to_owned()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(TunError::Open)?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a live, fully initialised struct ifreq layout (name,
    // flags, padding to its 40 bytes) that the kernel reads and writes back
    // within the call; the fd is an open /dev/net/tun file.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut IfReqFlags,
        )
    };
    if rc != 0 {
        return Err(TunError::Create {
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}
