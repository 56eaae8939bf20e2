#!/usr/bin/env python3
"""Side by side: live migration of the same running guest, QEMU -> QEMU
against the example VMM -> the example VMM.

    scripts/live_vs_qemu.py [--runs 5] [--mem-mib 128] [--downtime-limit-ms 300]
                            [--max-bandwidth BYTES_PER_S] [--channels 4]

Both run guest/loop.asm (QEMU: q35, SeaBIOS boots it from an IDE disk; the
example: loaded at 0x7c00 and entered at its 32-bit entry), the same RAM
size, multifd with the same channels, downtime limit and bandwidth, on
loopback TCP, under KVM. The runs are interleaved (QEMU, ours, QEMU, ...)
because this is a shared machine; medians are reported.

Columns:
* total time: QEMU's query-migrate `total-time`; ours the same span
  (migrate() start to the stream's end), both on the source;
* downtime: QEMU's query-migrate `downtime` (source: stop to completion);
  ours the same span;
* pause -> resume: the source's stop to the destination's resume, host
  clock (QEMU: the STOP event on the source and the RESUME event on the
  destination; ours: the VMMs' own stamps);
* transferred: QEMU's `ram.transferred`; ours every byte on every channel;
* dirty syncs: QEMU's `ram.dirty-sync-count`; ours the syncs of the
  iteration plus the final one after the pause.

Every run checks that the destination's guest goes on (serial markers).
Prints a JSON line per run, then a Markdown table of medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_harness as h  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assemble(workdir):
    img = os.path.join(workdir, "boot.img")
    subprocess.run(["nasm", "-f", "bin", "-o", img, os.path.join(ROOT, "guest/loop.asm")],
                   check=True)
    with open(img, "r+b") as f:
        f.truncate(h.MiB)
    return img


def qemu_argv(workdir, name, boot, mem_mib, incoming):
    argv = [h.QEMU_BINARY, "-accel", "kvm", "-M", "q35", "-m", f"{mem_mib}M",
            "-drive", f"file={boot},format=raw,if=ide,file.locking=off",
            "-serial", f"file:{os.path.join(workdir, name + '.serial')}",
            "-display", "none", "-nodefaults",
            "-qmp", f"unix:{os.path.join(workdir, name + '.qmp')},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def serial_len(workdir, name):
    try:
        return os.path.getsize(os.path.join(workdir, name + ".serial"))
    except OSError:
        return 0


def ts(event):
    t = event["timestamp"]
    return t["seconds"] + t["microseconds"] / 1e6


def qemu_run(a, workdir, boot):
    port = h.free_tcp_port()
    src_p = h.start_process(qemu_argv(workdir, "src", boot, a.mem_mib, False), "src", workdir)
    dst_p = h.start_process(qemu_argv(workdir, "dst", boot, a.mem_mib, True), "dst", workdir)
    try:
        src = h.QMP(os.path.join(workdir, "src.qmp"), proc=src_p)
        dst = h.QMP(os.path.join(workdir, "dst.qmp"), proc=dst_p)
        params = {"multifd-channels": a.channels, "downtime-limit": a.downtime_limit_ms,
                  "max-bandwidth": a.max_bandwidth or (1 << 40)}
        for q in (src, dst):
            q.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "multifd", "state": True}]})
            q.execute("migrate-set-parameters", params)
        # SeaBIOS, then the loop; let it run as long as ours runs first.
        deadline = time.monotonic() + 60
        while serial_len(workdir, "src") < 3:
            if time.monotonic() > deadline:
                raise h.HarnessError("QEMU guest printed no markers")
            time.sleep(0.02)
        time.sleep(a.run_before)
        dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + 120
        while True:
            info = src.execute("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise h.HarnessError(f"QEMU migration: {info}")
            time.sleep(0.005)
        deadline = time.monotonic() + 30
        while dst.execute("query-status").get("status") != "running":
            if time.monotonic() > deadline:
                raise h.HarnessError("QEMU destination never ran")
            time.sleep(0.01)
        m = serial_len(workdir, "dst")
        deadline = time.monotonic() + 10
        while serial_len(workdir, "dst") < m + 3:
            if time.monotonic() > deadline:
                raise h.HarnessError("QEMU destination prints no markers")
            time.sleep(0.01)
        dst.execute("query-status")
        src.execute("query-status")
        stop = [e for e in src.events if e["event"] == "STOP"]
        resume = [e for e in dst.events if e["event"] == "RESUME"]
        ram = info["ram"]
        return {
            "who": "qemu", "total_ms": info["total-time"], "downtime_ms": info["downtime"],
            "pause_to_resume_ms": (ts(resume[-1]) - ts(stop[-1])) * 1e3 if stop and resume
            else None,
            "transferred": ram["transferred"], "dirty_syncs": ram["dirty-sync-count"],
            "setup_ms": info.get("setup-time"),
        }
    finally:
        src_p.kill()
        dst_p.kill()


def ours_run(a, workdir):
    port = h.free_tcp_port()
    common = ["--mem", str(a.mem_mib), "--channels", str(a.channels),
              "--downtime-limit-ms", str(a.downtime_limit_ms)]
    if a.max_bandwidth:
        common += ["--max-bandwidth", str(a.max_bandwidth)]
    env = dict(os.environ, RUST_LOG="warn")
    dst_p = h.start_process([a.vmm, "--incoming", f"tcp:127.0.0.1:{port}", "--run-secs", "0.3"]
                            + common, "vmm-dst", workdir, env=env)
    try:
        deadline = time.monotonic() + 10
        while '"listening"' not in dst_p.stdout():
            if time.monotonic() > deadline or not dst_p.alive():
                raise h.HarnessError(f"VMM destination not listening: {dst_p.stderr_tail()}")
            time.sleep(0.01)
        src_p = h.start_process(
            [a.vmm, "--boot", os.path.join(ROOT, "guest/loop.asm"),
             "--migrate-to", f"tcp:127.0.0.1:{port}", "--migrate-after", str(a.run_before)]
            + common, "vmm-src", workdir, env=env)
        if src_p.wait(120) != 0:
            raise h.HarnessError(f"VMM source failed: {src_p.stdout()} {src_p.stderr_tail()}")
        if dst_p.wait(60) != 0:
            raise h.HarnessError(f"VMM destination failed: {dst_p.stderr_tail()}")
        ev = {}
        for p in (src_p, dst_p):
            for line in p.stdout().splitlines():
                if line.startswith("{"):
                    e = json.loads(line)
                    ev[e["event"]] = e
        mig, res = ev["migrated"], ev["resumed"]
        if "running" not in ev:
            raise h.HarnessError("VMM destination: the guest did not go on")
        return {
            "who": "ours", "total_ms": mig["total_time_ms"],
            "downtime_ms": mig["downtime_us"] / 1e3,
            "pause_to_resume_ms": (int(res["resumed_unix_ns"]) - int(mig["paused_unix_ns"])) / 1e6,
            "transferred": mig["transferred"], "dirty_syncs": mig["dirty_sync_count"] + 1,
            "setup_ms": mig["setup_time_ms"],
        }
    finally:
        dst_p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--downtime-limit-ms", type=int, default=300)
    ap.add_argument("--max-bandwidth", type=int, default=0, help="bytes/s, 0: unlimited")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--run-before", type=float, default=1.0,
                    help="seconds the guest runs on the source before the migration")
    ap.add_argument("--vmm", default=os.path.join(ROOT, "target/release/multifd-vmm"))
    a = ap.parse_args()
    if not h.kvm_usable():
        sys.exit("needs /dev/kvm")
    if not os.path.exists(a.vmm):
        subprocess.run(["cargo", "build", "--release", "-p", "multifd-example-vmm"],
                       cwd=ROOT, check=True)
    h.install_signal_handlers()
    workdir = h.temp_dir("live-vs-qemu-")
    boot = assemble(workdir)
    print(f"# {h.qemu_version()}; {h.machine_note('kvm')}", flush=True)
    rows = []
    for i in range(a.runs):
        for run in (lambda: qemu_run(a, workdir, boot), lambda: ours_run(a, workdir)):
            r = run()
            r["run"] = i
            rows.append(r)
            print(json.dumps(r), flush=True)
    cols = ["total_ms", "downtime_ms", "pause_to_resume_ms", "transferred", "dirty_syncs"]
    print()
    print(f"median of {a.runs} runs, {a.mem_mib} MiB guest, {a.channels} channels, "
          f"downtime limit {a.downtime_limit_ms} ms, max bandwidth "
          f"{a.max_bandwidth or 'unlimited'}")
    print()
    print("| | total time (ms) | downtime (ms) | pause -> resume (ms) | transferred (MiB) "
          "| dirty syncs |")
    print("|---|---|---|---|---|---|")
    for who in ("qemu", "ours"):
        rs = [r for r in rows if r["who"] == who]
        med = {c: statistics.median(r[c] for r in rs if r[c] is not None) for c in cols}
        rng = {c: (min(r[c] for r in rs if r[c] is not None),
                   max(r[c] for r in rs if r[c] is not None)) for c in cols}
        name = "QEMU 10 -> QEMU 10" if who == "qemu" else "example VMM -> example VMM"
        print(f"| {name} | {med['total_ms']:.0f} ({rng['total_ms'][0]:.0f}-{rng['total_ms'][1]:.0f})"
              f" | {med['downtime_ms']:.1f} ({rng['downtime_ms'][0]:.1f}-{rng['downtime_ms'][1]:.1f})"
              f" | {med['pause_to_resume_ms']:.1f} ({rng['pause_to_resume_ms'][0]:.1f}-"
              f"{rng['pause_to_resume_ms'][1]:.1f})"
              f" | {med['transferred'] / h.MiB:.1f} | {med['dirty_syncs']:.0f} |")


if __name__ == "__main__":
    main()
