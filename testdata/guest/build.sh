#!/bin/sh
# Assembles and links the counter test guest into a flat binary loaded at 0x10000 (GNU binutils).
# Usage: build.sh [OUTPUT]   (default: counter.bin next to this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/counter.bin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/counter.o" "$here/counter.S"
ld -m elf_x86_64 -e kernel_entry -Ttext=0x10000 --oformat=binary -o "$out" "$tmp/counter.o"
