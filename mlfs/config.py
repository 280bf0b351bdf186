"""Defaults and the ``MLFS_*`` environment variables, read in one place.

Every tunable default of mlfs lives here, so a number appears once.  Environment variables are read
when this module is first imported: set them before importing mlfs (the test suite's conftest does).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Tensors larger than this are cut into pieces of this size, aligned to the tensor's start
#: (docs/adr/0001-chunking.md has the measurement behind the number).
PIECE_SIZE = 4 << 20
#: A large tensor's first and last bytes are chunks of their own — a *head* of this many bytes
#: and a *tail* of that many (docs/adr/0018).  A page fault in an mmap reads a window around it,
#: and the kernel reads ahead past the end of the tensor that was wanted: that spill (up to
#: ~384 KiB forward, 128 KiB back at the default read-ahead) then costs a head or a tail, not a
#: 4 MiB piece.  ``MLFS_EDGES=0`` turns edges off (benchmarks compare); set before import.
EDGE_HEAD, EDGE_TAIL = ((512 << 10, 256 << 10) if os.environ.get("MLFS_EDGES", "") != "0"
                        else (0, 0))
#: Consecutive tensors smaller than this are packed into one chunk ...
SMALL_TENSOR = 64 << 10
#: ... as long as the pack stays below this size.
PACK_LIMIT = 1 << 20
#: What happens to runs of small tensors: "separate", "pack" or "glue" (see chunking.py).
SMALL_POLICY = "glue"
#: Non-safetensors files are cut into pieces of this size.
GENERIC_PIECE_SIZE = 4 << 20
#: Largest chunk a manifest may reference (protects memory against hostile manifests).
MAX_CHUNK_SIZE = 64 << 20

#: Total time a store read may spend retrying before it is reported as failed (seconds).
RETRY_DEADLINE = float(os.environ.get("MLFS_RETRY_DEADLINE", "20"))
#: GETs of a chunk whose body fails its blake3 check before the object is called corrupt.  A flipped
#: byte in transit is rare; five in a row is not transit.  (At three, the fault-injection test, one
#: GET in twenty flipped, failed about one run in thirty: a few hundred chunks, 0.05^3 each.)
CORRUPT_ATTEMPTS = 5
#: Per-request socket timeouts for S3 (seconds).
S3_CONNECT_TIMEOUT = float(os.environ.get("MLFS_S3_CONNECT_TIMEOUT", "5"))
S3_READ_TIMEOUT = float(os.environ.get("MLFS_S3_READ_TIMEOUT", "10"))
#: ``MLFS_S3_DIRECT=0`` sends every S3 GET through boto3 instead of the direct path (ADR 0010).
S3_DIRECT = os.environ.get("MLFS_S3_DIRECT", "1") != "0"
#: ``MLFS_RAW_HTTP=0`` reads plain-http bodies through urllib3 instead of :mod:`mlfs.rawhttp`.
RAW_HTTP = os.environ.get("MLFS_RAW_HTTP", "1") != "0"
#: ``MLFS_EARLY_MOUNT=0``: a root ``mlfs mount`` lets its daemon make the kernel mount once it has
#: imported pyfuse3 and trio, instead of making it itself first (docs/adr/0021).
EARLY_MOUNT = os.environ.get("MLFS_EARLY_MOUNT", "1") != "0"

#: ``MLFS_HTTP_HEADER="Name: value"``: one header sent with every request to an HTTP store.
HTTP_HEADER = os.environ.get("MLFS_HTTP_HEADER", "")

#: gc deletes a chunk only if the HEAD that showed it old happened less than this long ago (s);
#: generate waits longer than this after refreshing existing chunks before checking they are still
#: there (docs/adr/0005-gc.md).
GC_DELETE_WINDOW = float(os.environ.get("MLFS_GC_DELETE_WINDOW", "1.0"))
#: Default ``mlfs gc --grace``.
GC_GRACE = "1h"

#: Store used when ``--store`` is not given.
DEFAULT_STORE = os.environ.get("MLFS_STORE")

#: ``MLFS_DEBUG=1``: the CLI shows tracebacks instead of one-line errors.
DEBUG = bool(os.environ.get("MLFS_DEBUG"))

#: Mount defaults (``mlfs mount --memory/--timeout/--read-ahead/--poll``).
DEFAULT_CACHE_SIZE = os.environ.get("MLFS_CACHE_SIZE", "20G")
DEFAULT_MEMORY = "256M"
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_READ_AHEAD = "128K"
DEFAULT_CATALOG_POLL = 30.0
#: Hashing/upload threads of ``generate`` and ``export``.
DEFAULT_THREADS = 8
MAX_THREADS = 256

#: A background task of a mount (manifest watch, catalog poll, control socket) that fails is
#: restarted after this delay, doubling up to the maximum (seconds).
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0


def default_cache_dir() -> Path:
    """``$MLFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlfs``, else ``~/.cache/mlfs``."""
    if os.environ.get("MLFS_CACHE_DIR"):
        return Path(os.environ["MLFS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlfs"


def runtime_dir() -> Path:
    """Where mounts put their control sockets and ``mlfs switch`` its temporary manifests:
    ``$XDG_RUNTIME_DIR/mlfs``, else ``/tmp/mlfs-<uid>`` (short enough for AF_UNIX's 108 bytes)."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "mlfs"
    return Path(f"/tmp/mlfs-{os.getuid()}")


def parse_size(text: str) -> int:
    """``"20G"``, ``"512M"``, ``"1.5GiB"``, ``"4096"`` → bytes (binary units)."""
    from .errors import UsageError

    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise UsageError(f"invalid size {text!r} (examples: 20G, 512M, 1048576)") from None
    if value < 0 or value != value or value == float("inf"):
        raise UsageError(f"invalid size {text!r}: must be a finite, non-negative number")
    return int(value * mult)
