#!/usr/bin/env bash
# The main job: boot the counter guest on a fresh qcow2 image, savevm while it runs, quit,
# resume it in a new process with --loadvm, then list and inspect the snapshot.
# Needs /dev/kvm. VMSNAP_BIN_DIR=DIR uses already built binaries instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }; then
    echo "demo.sh: this demo runs a guest under KVM and needs read/write access to /dev/kvm," >&2
    echo "demo.sh: which is missing or not accessible here. Nothing was done." >&2
    exit 1
fi

if [ -n "${VMSNAP_BIN_DIR:-}" ]; then
    B=$VMSNAP_BIN_DIR
else
    cargo build --release --quiet
    B=target/release
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/disk.qcow2
run() { echo "\$ $*"; "$@"; }
last_tick() { grep '^tick ' "$1" | tail -n 1 | cut -d' ' -f2; }

run $B/vmsnap create -f qcow2 "$img" 64M

echo
echo "== 1. boot the counter guest (2 vCPUs), savevm 'demo' while it runs, go on, quit"
{
    sleep 1
    echo "stop"
    sleep 0.2
    echo "demo.sh: last tick before savevm: $(last_tick "$work/serial1.txt")" >&2
    echo "savevm demo"
    echo "info snapshots"
    echo "cont"
    sleep 0.5
    echo "quit"
} | run $B/vmsnap run --drive "file=$img" --guest counter --memory 32M --smp 2 \
    --serial "file:$work/serial1.txt" --monitor stdio

echo
echo "== 2. a new process resumes from the snapshot"
{ sleep 1.2; echo "quit"; } | run $B/vmsnap run --drive "file=$img" --guest counter \
    --memory 32M --smp 2 --serial "file:$work/serial2.txt" --monitor stdio --loadvm demo
echo
echo "first lines of its serial output (the tick after the saved one, then the guest's check):"
grep -m 1 '^tick ' "$work/serial2.txt"
grep -m 1 '^CHECK' "$work/serial2.txt" || echo "(no check ran yet)"

echo
echo "== 3. list, check and inspect the snapshot"
run $B/vmsnap snapshot -l "$img"
run $B/vmsnap check "$img"
run $B/vmsnap-inspect "$img" --snapshot demo | head -n 40
echo "..."
