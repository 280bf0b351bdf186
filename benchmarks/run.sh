#!/usr/bin/env bash
# Every benchmark, peers installed first. Needs root (FUSE, dropping the page cache).
#   bash benchmarks/run.sh            (or: make bench)
set -euo pipefail
cd "$(dirname "$0")/.."
MLFS_EXTRAS="test,torch,bench" bash scripts/setup.sh
need=()
for pkg in rclone s3fs nodejs npm iproute2 curl; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && need=("${need[@]/nodejs}") && need=("${need[@]/npm}")
need=($(printf '%s\n' "${need[@]}" | grep -v '^$' || true))
[ ${#need[@]} -eq 0 ] || apt-get install -y "${need[@]}" >/dev/null
S3RVER_DIR="${S3RVER_DIR:-/opt/s3rver}"
[ -x "$S3RVER_DIR/node_modules/.bin/s3rver" ] || (mkdir -p "$S3RVER_DIR" && cd "$S3RVER_DIR" && npm install --silent s3rver >/dev/null)
export S3RVER="$S3RVER_DIR/node_modules/.bin/s3rver"
PY=.venv/bin/python
echo "== dedup (benchmarks/dedup.py)"; $PY benchmarks/dedup.py
echo "== generate throughput (benchmarks/generate_throughput.py)"; $PY benchmarks/generate_throughput.py
echo "== manifest load (benchmarks/manifest_load.py)"; $PY benchmarks/manifest_load.py
echo "== switch (benchmarks/switch_bench.py)"; $PY benchmarks/switch_bench.py
echo "== cache file I/O (benchmarks/cache_io.py)"; $PY benchmarks/cache_io.py
echo "== mount vs peers (benchmarks/mount_bench.py)"; $PY benchmarks/mount_bench.py
echo "== read-path A/B (benchmarks/read_path_ab.py)"; $PY benchmarks/read_path_ab.py
echo "== GET size vs S3 server CPU (benchmarks/request_size.py)"; $PY benchmarks/request_size.py
echo "== the mount's GET client vs obstore (benchmarks/get_client.py)"; $PY benchmarks/get_client.py
echo "== CPU budget behind the unmet targets (benchmarks/bounds.py)"; $PY benchmarks/bounds.py
echo "== loads over a shaped link vs s5cmd, Run:ai, local disk (benchmarks/load_bench.py)"; $PY benchmarks/load_bench.py
echo "== where a cold load's CPU goes, mlfs vs s5cmd (benchmarks/cpu_split.py)"; $PY benchmarks/cpu_split.py
echo "== two mounts of one cache loading one model (benchmarks/shared_cache.py)"; $PY benchmarks/shared_cache.py
echo "== the disk: a model file vs chunk files (benchmarks/disk_reads.py)"; $PY benchmarks/disk_reads.py
echo "== fleet rollout over a shaped WAN (benchmarks/fleet_bench.py)"; $PY benchmarks/fleet_bench.py
