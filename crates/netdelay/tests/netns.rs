//! The delay line between two real network namespaces, at 100 Mbit/s with a
//! 10 ms round trip: a TCP round trip takes at least 10 ms and a transfer
//! goes no faster than the rate; deleting a namespace ends the line. Needs
//! root (namespaces, TUN devices): it
//! fails without, it does not skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netdelay::netns;

const RATE_BPS: f64 = 100e6;
const RTT: Duration = Duration::from_millis(10);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two namespaces and the delay line: removed on drop, also when an
/// assertion failed.
struct Line {
    names: Vec<String>,
    child: Option<Child>,
}

impl Line {
    fn new() -> Self {
        let euid = Command::new("id").arg("-u").output().expect("running id");
        assert_eq!(
            String::from_utf8_lossy(&euid.stdout).trim(),
            "0",
            "this test needs root"
        );
        let pid = std::process::id();
        let mut line = Line {
            names: Vec::new(),
            child: None,
        };
        for side in ["src", "dst"] {
            let name = format!("ndtest-{side}-{pid}");
            ip(&["netns", "add", &name]);
            line.names.push(name);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_netdelay"))
            .args(["--src", &line.names[0], "--dst", &line.names[1]])
            .args(["--rate", "100mbit", "--rtt-ms", "10"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting netdelay");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut ready)
            .expect("reading netdelay");
        line.child = Some(child);
        assert_eq!(ready.trim(), "ready", "netdelay did not start");
        for (ns, dev, addr) in [(0, "ndsrc", "10.77.0.1/24"), (1, "nddst", "10.77.0.2/24")] {
            let ns = line.names[ns].as_str();
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "mtu", "65000", "up"]);
        }
        line
    }

    fn ns(&self, i: usize) -> PathBuf {
        netns::resolve(&self.names[i])
    }

    /// Deletes namespace `i` and waits (up to `patience`) for the delay line
    /// to notice and exit; returns whether it exited successfully.
    fn delete_and_wait(&mut self, i: usize, patience: Duration) -> bool {
        let name = self.names.remove(i);
        ip(&["netns", "del", &name]);
        let child = self.child.as_mut().expect("running");
        let end = Instant::now() + patience;
        while Instant::now() < end {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("netdelay still running {patience:?} after its namespace was deleted");
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A server in the destination namespace: echoes one byte, then reads to
/// the end and answers with one byte.
fn server(listener: TcpListener) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo read");
        s.write_all(&b).expect("echo write");
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf).expect("bulk read") {
                0 => break,
                n => total += n,
            }
        }
        s.write_all(b"k").expect("final write");
        total
    })
}

#[test]
fn rtt_and_rate_of_a_100mbit_10ms_link() {
    let mut line = Line::new();
    let listener = netns::within(&line.ns(1), || TcpListener::bind("10.77.0.2:0"))
        .expect("entering the destination")
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let srv = server(listener);

    let t0 = Instant::now();
    let mut c = netns::within(&line.ns(0), || TcpStream::connect(("10.77.0.2", port)))
        .expect("entering the source")
        .expect("connect");
    let connect = t0.elapsed();
    c.set_nodelay(true).expect("nodelay");
    let t1 = Instant::now();
    c.write_all(b"x").expect("echo write");
    let mut b = [0u8; 1];
    c.read_exact(&mut b).expect("echo read");
    let echo = t1.elapsed();
    eprintln!("connect {connect:?}, echo {echo:?}");
    for (what, t) in [("connect", connect), ("echo", echo)] {
        assert!(
            t >= RTT,
            "{what} took {t:?}, less than the {RTT:?} round trip"
        );
        assert!(t < Duration::from_millis(100), "{what} took {t:?}");
    }

    const BYTES: usize = 4 << 20;
    let data = vec![0x5au8; BYTES];
    let t2 = Instant::now();
    c.write_all(&data).expect("bulk write");
    c.shutdown(Shutdown::Write).expect("shutdown");
    c.read_exact(&mut b).expect("final read");
    let bulk = t2.elapsed();
    assert_eq!(srv.join().expect("server"), BYTES);
    let rate = BYTES as f64 * 8.0 / bulk.as_secs_f64();
    eprintln!("{BYTES} bytes in {bulk:?}: {:.1} Mbit/s", rate / 1e6);
    assert!(
        rate <= RATE_BPS * 1.1,
        "{:.1} Mbit/s over a 100 Mbit/s link",
        rate / 1e6
    );
    assert!(bulk < Duration::from_secs(60), "transfer took {bulk:?}");

    drop(c);
    assert!(
        line.delete_and_wait(1, Duration::from_secs(10)),
        "netdelay failed on exit"
    );
}
