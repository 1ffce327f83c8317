#!/bin/sh
# Assembles and links the benchmark's QEMU guest into a multiboot ELF loaded at 1 MiB (GNU
# binutils). Usage: build.sh [OUTPUT]   (default: dirty.elf next to this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/dirty.elf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --32 -o "$tmp/dirty.o" "$here/dirty.S"
ld -m elf_i386 -e _start -Ttext=0x100000 --build-id=none -n -o "$out" "$tmp/dirty.o"
