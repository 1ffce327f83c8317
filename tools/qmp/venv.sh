#!/usr/bin/env bash
# Makes (once) a virtualenv with QEMU's Python QMP library, qemu.qmp from PyPI, under
# target/qmp-venv, and prints its python. Fails loudly when it cannot be installed: the QMP
# tests must not skip silently.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${QMP_VENV:-$PWD/target/qmp-venv}"
if ! "$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null; then
  python3 -m venv "$venv" >&2 || {
    echo "!! python3 -m venv failed (install python3-venv)" >&2
    exit 1
  }
  "$venv/bin/pip" install -q 'qemu.qmp>=0.0.3' >&2 || {
    echo "!! pip install qemu.qmp failed" >&2
    exit 1
  }
fi
echo "$venv/bin/python"
