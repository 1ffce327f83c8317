#!/usr/bin/env bash
# Records QEMU 7.2's side of tools/qmp/sequence.py as fixtures in testdata/qmp/: a small TCG
# machine (SeaBIOS looping on "no bootable device" is a running guest for savevm) with one
# blank qcow2 node "disk0". Needs qemu-system-x86_64 7.2 and the qemu.qmp virtualenv
# (tools/qmp/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
py="$(tools/qmp/venv.sh)"
out=testdata/qmp
mkdir -p "$out"
dir="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
qemu_with_qmp() { # SOCK IMAGE [extra args]
  local sock="$1" img="$2"
  shift 2
  qemu-system-x86_64 -nodefaults -display none -machine pc -accel tcg -m 32 \
    -blockdev "driver=file,filename=$img,node-name=file0" \
    -blockdev driver=qcow2,file=file0,node-name=disk0 \
    -qmp "unix:$sock,server=on,wait=off" "$@" &
  for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.1; done
  echo "QEMU's QMP socket never appeared" >&2
  return 1
}
for scenario in snapshot protocol; do
  qemu-img create -q -f qcow2 "$dir/$scenario.qcow2" 64M
  qemu_with_qmp "$dir/$scenario.sock" "$dir/$scenario.qcow2"
  "$py" tools/qmp/sequence.py "$dir/$scenario.sock" "$scenario" disk0 >"$out/qemu-$scenario.json"
  kill %% 2>/dev/null || true
  wait 2>/dev/null || true
done
# A writable raw node next to the qcow2 one.
qemu-img create -q -f qcow2 "$dir/r.qcow2" 64M
qemu-img create -q -f raw "$dir/r.raw" 1M
qemu_with_qmp "$dir/r.sock" "$dir/r.qcow2" \
  -blockdev "driver=file,filename=$dir/r.raw,node-name=rawfile" \
  -blockdev driver=raw,file=rawfile,node-name=raw0
"$py" tools/qmp/sequence.py "$dir/r.sock" rawdev disk0 raw0 >"$out/qemu-rawdev.json"
kill %% 2>/dev/null || true
wait 2>/dev/null || true
# Migration between two QEMUs over a unix socket, with the events capability on.
qemu-img create -q -f qcow2 "$dir/m.qcow2" 64M
qemu_with_qmp "$dir/dst.sock" "$dir/m.qcow2" -incoming "unix:$dir/mig.sock"
qemu_with_qmp "$dir/src.sock" "$dir/m.qcow2"
"$py" tools/qmp/sequence.py "$dir/src.sock" migrate "unix:$dir/mig.sock" >"$out/qemu-migrate.json"
kill %% %- 2>/dev/null || true
wait 2>/dev/null || true
# The dirty-rate measurement (page-sampling; only the shapes are compared).
qemu-img create -q -f qcow2 "$dir/d.qcow2" 64M
qemu_with_qmp "$dir/d.sock" "$dir/d.qcow2"
"$py" tools/qmp/sequence.py "$dir/d.sock" dirtyrate >"$out/qemu-dirtyrate.json"
echo "recorded: $(ls $out)"
