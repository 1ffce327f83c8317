#!/usr/bin/env bash
# Long runs of the random-damage test (tests/qcow2_random_damage.rs): seeded random damage to
# the metadata of the QEMU 7.2 fixtures, each case followed by info, snapshot -l, check and
# one writing command, checked against qemu-img.
# Usage: tools/scripts/damage.sh --cases N [--seed S] [--jobs J] [--only I] [--keep DIR] [--strict-writes]
#   --seed S          decimal or 0x-hex; each case derives its own seed from S and its index
#   --jobs J          cases run in parallel (default 2)
#   --only I          run case I of that seed only (to reproduce a failure)
#   --keep DIR        keep the damaged image of every failing case in DIR
#   --strict-writes   also fail on write-side violations on images qemu-img calls corrupt
# Needs qemu-img 7.2 (tools/scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
while [ $# -gt 0 ]; do
    case "$1" in
        --cases) export DAMAGE_CASES="$2"; shift 2 ;;
        --seed) export DAMAGE_SEED="$2"; shift 2 ;;
        --only) export DAMAGE_ONLY="$2"; shift 2 ;;
        --keep) export DAMAGE_KEEP="$2"; shift 2 ;;
        --jobs) export DAMAGE_JOBS="$2"; shift 2 ;;
        --strict-writes) export DAMAGE_STRICT_WRITES=1; shift ;;
        *) echo "usage: $0 --cases N [--seed S] [--jobs J] [--only I] [--keep DIR] [--strict-writes]" >&2; exit 2 ;;
    esac
done
exec cargo test --test qcow2_random_damage -- --nocapture --test-threads=1
