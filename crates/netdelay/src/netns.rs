//! Network namespaces named on the command line, and running code inside one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Errors entering or leaving a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("opening network namespace {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// setns(2) refused.
    #[error("setns into {path}: {source}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The file of a namespace given by name (`ip netns add NAME`, which bind
/// mounts it at /run/netns/NAME) or by path (such as /proc/PID/ns/net).
pub fn resolve(spec: &str) -> PathBuf {
    if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        Path::new("/run/netns").join(spec)
    }
}

fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })
}

fn enter(ns: &File, path: &Path) -> Result<(), NetnsError> {
    // SAFETY: `ns` is an open namespace file for the duration of the call;
    // setns only switches the calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` with the calling thread inside the network namespace at `path`,
/// then switches back to the thread's own namespace, whatever `f` returned.
/// File descriptors opened by `f` stay usable afterwards and keep the objects
/// they refer to in `path`'s namespace.
pub fn within<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
    let home_path = Path::new("/proc/thread-self/ns/net");
    let home = open(home_path)?;
    let target = open(path)?;
    enter(&target, path)?;
    let out = f();
    enter(&home, home_path)?;
    Ok(out)
}
