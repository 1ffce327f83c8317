#!/usr/bin/env bash
# Regenerates the golden images of this directory with QEMU's tools (QEMU 7.2).
# They let tests/qcow2_golden.rs check vmsnap's reader where QEMU is not installed.
set -euo pipefail
cd "$(dirname "$0")"
rm -f small-v3.qcow2 small-v2.qcow2

# small-v3: compat 1.1, 4 KiB clusters, 1 MiB; snapshot s1 after 0x11, then 0x22 and a
# zeroed range in the active layer.
qemu-img create -q -f qcow2 -o cluster_size=4k small-v3.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0x11 0 16k' -c 'write -P 0x12 512k 4k' small-v3.qcow2 >/dev/null
qemu-img snapshot -c s1 small-v3.qcow2
qemu-io -f qcow2 -c 'write -P 0x22 4k 4k' -c 'write -z 512k 4k' small-v3.qcow2 >/dev/null

# small-v2: compat 0.10, 512-byte clusters, 256 KiB; two snapshots. (64-bit refcounts need v3.)
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 small-v2.qcow2 256k
qemu-io -f qcow2 -c 'write -P 0x31 0 1536' small-v2.qcow2 >/dev/null
qemu-img snapshot -c a small-v2.qcow2
qemu-io -f qcow2 -c 'write -P 0x32 1k 1k' small-v2.qcow2 >/dev/null
qemu-img snapshot -c b small-v2.qcow2
qemu-io -f qcow2 -c 'discard 0 512' small-v2.qcow2 >/dev/null

for f in small-v3.qcow2 small-v2.qcow2; do
  qemu-img check "$f" >/dev/null
  qemu-img snapshot -l "$f"
done
