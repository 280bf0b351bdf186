#!/usr/bin/env bash
# Everything mlfs needs on a fresh Debian machine (Python 3.11, root): system packages for FUSE,
# a virtual environment in .venv, and the package with its test and torch extras.
# Idempotent: a second run only checks. Used by `make demo`, `make test`, .ci/run and the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# nginx: the tests put a real HTTP server and cache in front of HTTP stores and `mlfs serve`.
# libxxhash-dev: the header the C data plane (mlfs/_dataplane.c) is built with.
for pkg in fuse3 libfuse3-dev pkg-config nginx-light libxxhash-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v gcc >/dev/null 2>&1 || need+=(gcc)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y --no-install-recommends "${need[@]}" >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi

EXTRAS="${MLFS_EXTRAS-test,torch}"
stamp=".venv/.mlfs-setup-$(cat pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS//,/-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "setup: installing mlfs[$EXTRAS] into .venv" >&2
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, pinned: a CPU build; anything unpinned would pull several GB of CUDA packages.
  if [[ ",$EXTRAS," == *",torch,"* ]]; then
    .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  fi
  spec="."; [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  .venv/bin/pip install -q -e "$spec" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import mlfs, pyfuse3, blake3" 
  touch "$stamp"
fi
# Byte-compile mlfs, as a wheel install would (editable installs leave it to the first import).
# Without it every mlfs process compiles what it imports whenever Python may not write
# __pycache__ (PYTHONDONTWRITEBYTECODE, a read-only image): 40-50 ms more per mount command, per
# mount daemon and per `mlfs switch` here.  Only changed files are compiled again.
.venv/bin/python -m compileall -q mlfs >/dev/null || true
