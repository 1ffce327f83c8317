#!/bin/sh
# Assembles and links the counter test guest into a flat binary loaded at 0x10000 (GNU binutils).
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/counter.o" counter.S
ld -m elf_x86_64 -e kernel_entry -Ttext=0x10000 --oformat=binary -o counter.bin "$tmp/counter.o"
