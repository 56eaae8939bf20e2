#!/usr/bin/env python3
"""Back-to-back live migrations of the example VMM's running guest.

    scripts/live_pingpong.py [--hops 100] [--downtime-limit-ms 300] [--vmm PATH]

Hop 0 boots guest/loop.asm and migrates it live to a VMM waiting with
`--incoming`; that one checks the guest, lets it run, and migrates it on to
the next, which listens on the other port: two endpoints, ping-pong. Every
hop must: converge (the source prints "migrated"), resume on the
destination with its serial markers going on and its counters consistent
with them (the destination prints "running" after a paused check), and
have a downtime, from the source's pause to the destination's resume (both
stamped with the host's clock), of at most the limit + 50 ms.

Set MULTIFD_VMM_NO_KVM=1 to run the workload guest (write-protect dirty
tracking) instead of KVM. Prints one line per hop and a summary; exits 1 if
any hop failed. Needs a release build of the example (built when missing).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def events(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def find(evs, name):
    for e in evs:
        if e.get("event") == name:
            return e
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hops", type=int, default=100)
    ap.add_argument("--downtime-limit-ms", type=int, default=300)
    ap.add_argument("--run-before-migrate", type=float, default=0.4,
                    help="seconds each VMM runs the guest before migrating it on")
    ap.add_argument("--ports", default="47311,47312")
    ap.add_argument("--vmm", default=os.path.join(ROOT, "target/release/multifd-vmm"))
    ap.add_argument("--extra", default="", help="more arguments for every VMM")
    a = ap.parse_args()
    if not os.path.exists(a.vmm):
        subprocess.run(["cargo", "build", "--release", "-p", "multifd-example-vmm"],
                       cwd=ROOT, check=True)
    ports = [int(p) for p in a.ports.split(",")]
    uri = lambda i: f"tcp:127.0.0.1:{ports[i % 2]}"
    common = ["--downtime-limit-ms", str(a.downtime_limit_ms),
              "--migrate-after", str(a.run_before_migrate)] + a.extra.split()
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))

    def spawn(args):
        return subprocess.Popen([a.vmm] + args, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    # procs[i] migrates the guest to procs[i + 1] (which listens on uri(i + 1)).
    boot = ["--boot", os.path.join(ROOT, "guest/loop.asm")]
    nxt = spawn(["--incoming", uri(1), "--migrate-to", uri(2)] + common
                if a.hops > 1 else ["--incoming", uri(1), "--run-secs", "0.5"])
    time.sleep(0.3)
    cur = spawn(boot + ["--migrate-to", uri(1)] + common)
    rows, failures = [], []
    for hop in range(a.hops):
        try:
            out, err = cur.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            cur.kill()
            out, err = cur.communicate()
        src = events(out)
        mig = find(src, "migrated")
        # The VMM after next must listen before `nxt` migrates on.
        after = None
        if hop + 1 < a.hops:
            last = hop + 2 >= a.hops
            args = ["--incoming", uri(hop + 2)] + (
                ["--run-secs", "0.5"] if last else ["--migrate-to", uri(hop + 3)] + common)
            after = spawn(args)
        # `nxt` has received (or failed); wait for its "running" line.
        line_deadline = time.time() + 60
        dst_events = []
        while time.time() < line_deadline:
            line = nxt.stdout.readline()
            if not line:
                break
            dst_events += events(line)
            if find(dst_events, "running"):
                break
        res, run = find(dst_events, "resumed"), find(dst_events, "running")
        ok = cur.returncode == 0 and mig is not None and res is not None and run is not None
        row = {"hop": hop, "ok": ok}
        if mig and res:
            paused = int(mig["paused_unix_ns"])
            row.update({
                "downtime_ms": (int(res["resumed_unix_ns"]) - paused) / 1e6,
                "source_downtime_ms": mig["downtime_us"] / 1e3,
                "total_ms": mig["total_time_ms"],
                "rounds": mig["rounds"],
                "transferred": mig["transferred"],
                "markers": res["markers"],
            })
            if row["downtime_ms"] > a.downtime_limit_ms + 50:
                row["ok"] = ok = False
                row["why"] = "downtime above the limit + 50 ms"
        if not ok:
            row.setdefault("why", (err or "")[-400:] + json.dumps(src)[-400:])
            failures.append(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        cur, nxt = nxt, after
        if not ok:
            break
    # The last VMM runs 0.5 s and exits.
    for p in (cur, nxt):
        if p is not None:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    good = [r for r in rows if r["ok"]]
    if good:
        d = [r["downtime_ms"] for r in good]
        print(json.dumps({
            "hops": len(rows), "passed": len(good), "failed": len(failures),
            "downtime_ms": {"median": statistics.median(d), "max": max(d), "min": min(d)},
            "source_downtime_ms_median": statistics.median(r["source_downtime_ms"] for r in good),
            "total_ms_median": statistics.median(r["total_ms"] for r in good),
            "rounds_median": statistics.median(r["rounds"] for r in good),
        }))
    print(f"{len(good)} passed, {len(rows) - len(good) + (a.hops - len(rows))} failed")
    sys.exit(0 if len(good) == a.hops else 1)


if __name__ == "__main__":
    main()
