#!/usr/bin/env bash
# The main job: a scripted tour of vmsnap on a fresh qcow2 image.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
B=target/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/disk.qcow2
run() { echo "\$ $*"; "$@"; }
run $B/vmsnap create -f qcow2 "$img" 64M
run $B/vmsnap io "$img" -c 'write -P 0x11 0 64k'
run $B/vmsnap snapshot -c first "$img"
run $B/vmsnap io "$img" -c 'write -P 0x22 0 4k'
run $B/vmsnap snapshot -l "$img"
run $B/vmsnap snapshot -a first "$img"
run $B/vmsnap io "$img" -c 'read -P 0x11 0 64k'
run $B/vmsnap snapshot -d first "$img"
run $B/vmsnap check "$img"
