#!/usr/bin/env bash
# The main job: a scripted tour of vmsnap on fresh images. Every step must succeed.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
B=target/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/disk.qcow2
data=$work/data.qcow2
run() { echo "\$ $*"; "$@"; }
run $B/vmsnap create -f qcow2 "$img" 64M
run $B/vmsnap create -f qcow2 -o cluster_size=512,refcount_bits=64 "$data" 16M
run $B/vmsnap io "$img" -c 'write -P 0x11 0 64k'
run $B/vmsnap snapshot -c first "$img"
run $B/vmsnap io "$img" -c 'write -P 0x22 0 4k'
run $B/vmsnap snapshot -l "$img"
run $B/vmsnap snapshot -a first "$img"
run $B/vmsnap io "$img" -c 'read -P 0x11 0 64k'
# Two disks of one VM: snapshots are taken, applied and deleted on both together.
run $B/vmsnap io "$data" -c 'write -P 0x33 1M 8k'
run $B/vmsnap snapshot -c both "$img" "$data"
run $B/vmsnap io "$data" -c 'write -z 1M 8k'
run $B/vmsnap snapshot -a both "$img" "$data"
run $B/vmsnap io "$data" -c 'read -P 0x33 1M 8k'
run $B/vmsnap snapshot -l --output json "$img" "$data"
run $B/vmsnap snapshot -d both "$img" "$data"
run $B/vmsnap snapshot -d first "$img"
run $B/vmsnap info "$img"
run $B/vmsnap check "$img"
run $B/vmsnap check --output json "$data"
