#!/usr/bin/env bash
# Installs what the test suite needs (QEMU 7.2 tools, matching the fixtures) and runs it:
# formatting, lints, and every test. KVM and qemu-system tests skip loudly where unavailable.
set -euo pipefail
cd "$(dirname "$0")/../.."

need_qemu() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-io >/dev/null \
    && qemu-img --version | grep -q 'version 7\.2'
}
if ! need_qemu; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing qemu-system-x86 and qemu-utils (QEMU 7.2, as the fixtures)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Both together: the system package alone would remove a newer preinstalled qemu-utils.
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
      qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm >/dev/null \
      || apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
  else
    echo "!! cannot install QEMU (not root or no apt-get); QEMU-dependent tests will skip loudly"
  fi
fi
qemu-img --version | head -1 || true
# `ip` for the live-migration test between two network namespaces (it skips loudly without).
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing iproute2"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 >/dev/null || true
fi
# gdb and readelf (binutils) to read vmsnap-inspect's ELF cores (tests/inspect_core.rs skips
# loudly without).
if ! { command -v gdb >/dev/null && command -v readelf >/dev/null; } \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing gdb and binutils"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends gdb binutils >/dev/null || true
fi
# QEMU's Python QMP client (qemu.qmp from PyPI) in a virtualenv under target/, for
# tests/qmp_*.rs, which fail loudly without it.
if ! tools/qmp/venv.sh >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing python3-venv"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null || true
  fi
  tools/qmp/venv.sh >/dev/null || echo "!! qemu.qmp could not be installed: tests/qmp_*.rs will fail"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --all-targets -- --test-threads="${TEST_THREADS:-2}"
# Optional: a 10 s libFuzzer run of every fuzz target (builds cargo-fuzz and fuzz/, several
# minutes); `cargo test --test fuzz_corpus` above already replays their corpus.
if [ "${FUZZ_SMOKE:-0}" = 1 ]; then
  for t in $(tools/scripts/fuzz.sh --list); do tools/scripts/fuzz.sh "$t" 10; done
fi
