#!/usr/bin/env bash
# The performance harness: vmsnap against QEMU on this machine, medians and ratios.
# Usage: tools/scripts/bench.sh [limits|block|convert|vm|vm-live|inspect|migrate|xbzrle|loadvm|nbd|save ...] [--runs N]
# Needs qemu-img/qemu-system-x86_64 7.2 (tools/scripts/test.sh installs them), /dev/kvm for the
# vm and migrate cases, and a few GiB free in $VMSNAP_BENCH_DIR (default /tmp).
# VMSNAP_BENCH_NBD_SERVER=nbdkit serves the nbd cases with nbdkit (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${VMSNAP_BENCH_NBD_SERVER:-}" = nbdkit ] && ! command -v nbdkit >/dev/null \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing nbdkit"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nbdkit >/dev/null || true
fi
exec cargo bench --bench perf -- "$@"
