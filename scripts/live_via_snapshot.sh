#!/usr/bin/env bash
# Example VMM -> `multifd receive --snapshot` -> `multifd send --snapshot`
# -> example VMM: a running guest is migrated live into a snapshot
# directory, replayed into a new VMM, and must go on running there (its
# serial markers continue and its counters are consistent with them).
#
#   scripts/live_via_snapshot.sh        (needs /dev/kvm and nasm; or set
#                                        MULTIFD_VMM_NO_KVM=1)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q -p multifd-cli -p multifd-example-vmm --manifest-path "$root/Cargo.toml"
cli=$root/target/release/multifd
vmm=$root/target/release/multifd-vmm
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(port)
p2=$(port)
export RUST_LOG=${RUST_LOG:-warn}

# 1. The running guest -> a snapshot directory.
"$cli" receive --listen "tcp:127.0.0.1:$p1" --snapshot "$work/snap" --channels 4 \
    --accept-timeout 30 --quiet --json > "$work/receive.json" &
pids+=($!)
sleep 0.3
"$vmm" --boot "$root/guest/loop.asm" --migrate-to "tcp:127.0.0.1:$p1" --migrate-after 1 \
    > "$work/source.json"
wait "${pids[0]}"
echo "source:   $(grep '"migrated"' "$work/source.json")"
echo "stored:   $(cat "$work/receive.json")"

# 2. The snapshot -> a new VMM, which resumes the guest.
"$vmm" --incoming "tcp:127.0.0.1:$p2" --run-secs 1 > "$work/dest.json" &
pids+=($!)
sleep 0.3
"$cli" send --to "tcp:127.0.0.1:$p2" --snapshot "$work/snap" --channels 4 --quiet --json \
    > "$work/send.json"
wait "${pids[1]}"
echo "replayed: $(cat "$work/send.json")"
echo "resumed:  $(grep '"resumed"' "$work/dest.json")"
grep '"running"' "$work/dest.json" | sed 's/^/running:  /'
grep -q '"running"' "$work/dest.json"
echo "1 passed, 0 failed"
