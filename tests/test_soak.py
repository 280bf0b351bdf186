"""The soak of benchmarks/soak.py in a short form: concurrent readers, three mounts, a faulty S3 and a
cache too small for the models — zero wrong bytes, zero failed reads, bounded memory and descriptors."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import fuse_available, require

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def test_short_soak_reads_only_right_bytes(moto_server):
    require(fuse_available(), "FUSE is not available")
    p = subprocess.run([sys.executable, str(SOAK), "--seconds", "12", "--readers", "6", "--rate", "0.2",
                        "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["wrong_bytes"] == 0 and r["read_errors"] == 0 and r["mounts_alive"]
    assert r["bytes_verified"] > 100 << 20 and r["faults_injected"] > 10
    assert r["faults_survived"] == r["faults_injected"]
    assert max(r["peak_rss_mib"]) < 1024 and max(r["max_open_fds"]) < 256
    assert r["cache_bytes_on_disk"] <= 40 << 20
