//! A real receiver (`multifd::receive`) on a watched helper thread, and
//! the short-timeout options the hostile cases give it.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd::{Incoming, Listener, MigrationConfig, Progress, RamProvider, ReceiveOptions};

use super::spawn;

pub type RecvResult = (multifd::Result<Incoming>, Duration);

/// A receiver running on a helper thread.
pub struct Receiving {
    pub handle: JoinHandle<()>,
    pub rx: mpsc::Receiver<RecvResult>,
    pub progress: Arc<Progress>,
}

/// Starts `receive` on a helper thread.
pub fn start_receiver(
    listener: Listener,
    opts: ReceiveOptions,
    mut provider: Box<dyn RamProvider + Send>,
) -> Receiving {
    let (tx, rx) = mpsc::channel();
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let handle = spawn("recv", move || {
        let t = Instant::now();
        let r = multifd::receive(&listener, &opts, provider.as_mut(), &p);
        let _ = tx.send((r, t.elapsed()));
        drop(listener);
    });
    Receiving {
        handle,
        rx,
        progress,
    }
}

impl Receiving {
    /// Waits for the result at most `limit`; `None` if the receiver hangs.
    pub fn wait(&self, limit: Duration) -> Option<RecvResult> {
        self.rx.recv_timeout(limit).ok()
    }
}

/// Receive options for hostile cases: small timeouts, `channels` channels.
pub fn recv_opts(channels: u8, handshake: Duration) -> ReceiveOptions {
    ReceiveOptions {
        config: MigrationConfig {
            channels,
            handshake_timeout: handshake,
            connect_timeout: Duration::from_secs(2),
            ..MigrationConfig::default()
        },
        accept_timeout: Some(Duration::from_secs(3)),
        ..ReceiveOptions::default()
    }
}
