//! Guest RAM files on transparent huge pages: a tmpfs mounted
//! `huge=always` (mounted here, so the test needs root) holds both the
//! source image and the destination file; `multifd send` → `multifd
//! receive` must arrive byte-identical, both sides must report the huge
//! page size in `--json` (`ram_page_size`), and the files must really be
//! on huge pages. Pages on the wire stay 4 KiB.
//!
//! Without root (or where the mount fails) this is a loud SKIPPED, or a
//! failure under `CI`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{TestCtx, compare_files, gen_image};

/// A tmpfs mounted `huge=HUGE` on a fresh directory, unmounted (and the
/// directory removed) on drop.
struct HugeMount(PathBuf);

impl HugeMount {
    /// Mounts it, or says why it cannot be: a failure under `CI`, a loud
    /// skip otherwise.
    fn new(test: &str, ctx: &TestCtx, huge: &str) -> Option<Self> {
        let dir = ctx.path("huge");
        std::fs::create_dir_all(&dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("huge={huge},size=1G,mode=0700"))
            .arg("multifd-test-huge")
            .arg(&dir)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Self(dir)),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => format!("running mount: {e}"),
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: cannot mount a huge=always tmpfs ({why}) and CI is set: \
             this test must run (as root)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: {test}: cannot mount a huge=always tmpfs ({why}); \
             the test did not run (run it as root; set CI=1 to make this a failure) ***\n"
        );
        None
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for HugeMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let _ = std::fs::remove_dir(&self.0);
        } else {
            eprintln!("could not unmount {}", self.0.display());
        }
    }
}

/// The transparent huge page size.
fn thp_size() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .expect("hpage_pmd_size")
        .trim()
        .parse()
        .expect("a number")
}

/// Maps the file named by argv[1], reads a byte of every page and prints
/// the bytes of the mapping mapped with PMDs (huge pages).
const PMD_MAPPED: &str = r#"
import mmap, sys
path = sys.argv[1]
f = open(path, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
s = sum(m[i] for i in range(0, len(m), 4096))
total, ours = 0, False
for line in open("/proc/self/smaps"):
    if line[:1].isupper():
        if ours and line.startswith("ShmemPmdMapped:"):
            total += int(line.split()[1]) * 1024
    else:
        ours = line.rstrip().endswith(path)
print(total)
"#;

/// Bytes of a file held in huge pages: the file's pages that the kernel
/// maps with PMDs when the whole file is mapped and read (`ShmemPmdMapped`
/// of the mapping in /proc/self/smaps).
fn pmd_mapped(path: &Path) -> u64 {
    let out = Command::new("python3")
        .arg("-c")
        .arg(PMD_MAPPED)
        .arg(path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a byte count")
}

/// Migrates the 64 MiB image at `src` into the new file `dst` (created by
/// the receiver); returns both sides' JSON statistics.
fn migrate(ctx: &TestCtx, src: &Path, dst: &Path) -> (serde_json::Value, serde_json::Value) {
    let (mut recv, port) = common::start_receiver(
        ctx,
        "receive",
        &[
            "--ram".to_owned(),
            format!("pc.ram={}", dst.display()),
            "--channels".into(),
            "4".into(),
            "--json".into(),
            "--quiet".into(),
        ],
    );
    let sent = ctx.run_multifd(
        "send",
        &[
            "send".to_owned(),
            "--to".into(),
            format!("tcp:127.0.0.1:{port}"),
            "--ram".into(),
            format!("pc.ram={}", src.display()),
            "--channels".into(),
            "4".into(),
            "--json".into(),
            "--quiet".into(),
        ],
        Duration::from_secs(60),
    );
    let (st, killed) = recv.wait_or_kill(Duration::from_secs(30));
    assert!(st.success() && !killed, "receiver\n{}", recv.output_tail());
    compare_files(src, dst, &[]).expect("destination RAM equals the source");
    let json = |s: &str| -> serde_json::Value {
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
    };
    let (sent, received) = (json(&sent), json(&recv.stdout_text()));
    // 64 MiB on the wire as 4 KiB pages (data pages plus zero pages).
    let pages = sent["normal_pages"].as_u64().unwrap() + sent["zero_pages"].as_u64().unwrap();
    assert_eq!(pages, 64 << 8, "{sent}");
    (sent, received)
}

#[test]
fn migrates_through_huge_page_tmpfs_byte_identically() {
    let test = "migrates_through_huge_page_tmpfs_byte_identically";
    if !common::require(test, &["python3"]) {
        return;
    }
    let ctx = TestCtx::new(test, Duration::from_secs(120));
    let Some(mount) = HugeMount::new(test, &ctx, "always") else {
        return;
    };
    let huge = thp_size();
    let (src, dst) = (mount.path("src.img"), mount.path("dst.img"));
    gen_image(&ctx, &src, 64, 7);
    let (sent, received) = migrate(&ctx, &src, &dst);
    for (side, v) in [("send", &sent), ("receive", &received)] {
        assert_eq!(v["ram_page_size"], huge, "{side}: {v}");
    }
    // Both files really are on huge pages (nearly all of them: the kernel
    // may fall back to small pages for a few when memory is fragmented).
    for f in [&src, &dst] {
        let pmd = pmd_mapped(f);
        assert!(
            pmd >= 48 << 20,
            "{}: {pmd} bytes on huge pages",
            f.display()
        );
    }
}
