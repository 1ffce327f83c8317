#!/bin/sh
# Regenerates testdata/stream/qemu-xbzrle.mig.zst: a QEMU 7.2 migration stream with XBZRLE pages,
# and testdata/stream/qemu-xbzrle.ram.zst: the guest RAM QEMU's own destination loads from it.
#
# Source: qemu-system-x86_64 -accel tcg -m 32M booting tools/bench/guest/dirty.elf (stores the
# tick number into the first dword of 80 pages per 10 ms tick, cycling through RAM from 2 MiB).
# The migration runs with capability xbzrle and max-bandwidth 4 MiB/s, so pages are sent in
# several rounds: round 2 fills the XBZRLE cache, later rounds send the re-dirtied pages as
# XBZRLE records. Once `info migrate` reports xbzrle pages, the bandwidth is lifted so that
# the migration completes. Destination: qemu-system-x86_64 -incoming 'exec:cat FILE', then
# `pmemsave 0 32M`. Needs qemu-system-x86_64 7.2, python3, zstd.
#
# Usage: tools/scripts/make-xbzrle-fixture.sh [OUTDIR]   (default: testdata/stream)
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$here/testdata/stream}
tmp=$(mktemp -d)
trap 'kill $(cat "$tmp"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$tmp"' EXIT
exec python3 - "$here/tools/bench/guest/dirty.elf" "$tmp" "$out" <<'PY'
import os, socket, subprocess, sys, time

elf, tmp, out = sys.argv[1:4]
common = ["qemu-system-x86_64", "-accel", "tcg", "-m", "32M", "-display", "none",
          "-nodefaults", "-machine", "pc"]

def monitor(path):
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    else:
        sys.exit("monitor did not come up: " + path)
    f = s.makefile("rwb", buffering=0)
    def prompt():
        got = b""
        while not got.endswith(b"(qemu) "):
            c = f.read(1)
            if not c:  # the monitor closed (after quit)
                break
            got += c
        return got
    prompt()
    def cmd(line):
        f.write(line.encode() + b"\n")
        got = prompt()
        # drop the echoed command line
        text = got.decode(errors="replace").replace("\r", "")
        return text[text.find("\n") + 1:-len("(qemu) ")]
    return cmd

mig = os.path.join(tmp, "qemu-xbzrle.mig")
src_mon = os.path.join(tmp, "src.sock")
src = subprocess.Popen(common + ["-kernel", elf, "-append", "20",
                                 "-monitor", "unix:%s,server=on,wait=off" % src_mon])
open(os.path.join(tmp, "src.pid"), "w").write(str(src.pid))
hmp = monitor(src_mon)
time.sleep(2)
hmp("migrate_set_capability xbzrle on")
hmp("migrate_set_parameter xbzrle-cache-size 8M")
hmp("migrate_set_parameter max-bandwidth 4M")
hmp("migrate_set_parameter downtime-limit 1")
hmp("migrate -d \"exec:cat > %s\"" % mig)
pages = 0
for _ in range(600):
    time.sleep(0.1)
    info = hmp("info migrate")
    for line in info.splitlines():
        if line.startswith("xbzrle pages:"):
            pages = int(line.split()[2])
    if pages >= 200:
        break
if pages == 0:
    sys.exit("QEMU sent no XBZRLE pages:\n" + info)
hmp("migrate_set_parameter downtime-limit 2000")
hmp("migrate_set_parameter max-bandwidth 1G")
for _ in range(600):
    time.sleep(0.1)
    info = hmp("info migrate")
    if "Migration status: completed" in info:
        break
else:
    sys.exit("migration did not complete:\n" + info)
print(info)
hmp("quit")
src.wait()

dst_mon = os.path.join(tmp, "dst.sock")
dst = subprocess.Popen(common + ["-S", "-incoming", "exec:cat %s" % mig,
                                 "-monitor", "unix:%s,server=on,wait=off" % dst_mon])
open(os.path.join(tmp, "dst.pid"), "w").write(str(dst.pid))
hmp = monitor(dst_mon)
# -S: the loaded guest stays paused (its RAM is what the stream carried)
for _ in range(600):
    status = hmp("info status")
    if "paused" in status and "inmigrate" not in status:
        break
    time.sleep(0.1)
else:
    sys.exit("destination did not finish loading: " + status)
ram = os.path.join(tmp, "qemu-xbzrle.ram")
print(hmp("info status"))
print(hmp("pmemsave 0 0x2000000 \"%s\"" % ram))
hmp("quit")
dst.wait()
for name in (mig, ram):
    subprocess.run(["zstd", "-19", "-q", "-f", name, "-o",
                    os.path.join(out, os.path.basename(name) + ".zst")], check=True)
print("wrote", out)
PY
