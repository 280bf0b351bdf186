"""The warm load's byte-moving steps in C (``mlfs/_dataplane.c``, docs/adr/0029), where built.

A warm load moves every byte of a model from the disk cache into the kernel's page cache: read a
chunk file with ``O_DIRECT``, check its seal, remember its block checksums, push its pages with
``FUSE_NOTIFY_STORE``.  In Python each step gives up and takes back the GIL, and with the event
loop and the FUSE workers wanting it too, each hand-over is a futex wake-up: wake-ups and the
interpreter were ~35% of the mount's CPU in a warm load (docs/adr/0027).  The C steps release the
GIL once per chunk read and once per push.

Optional, like ``mlfs._shuffle``: without a compiler or libxxhash the same steps run in Python
(``MLFS_NATIVE=0`` forces that, for comparisons).
"""

from __future__ import annotations

import os

try:
    from . import _dataplane as _native
except ImportError:  # built without a compiler or libxxhash-dev: the Python steps
    _native = None

#: The C steps are used (built, and not turned off with ``MLFS_NATIVE=0``).
NATIVE = _native is not None and os.environ.get("MLFS_NATIVE", "1") != "0"

if NATIVE:
    read_sealed = _native.read_sealed
    store = _native.store
    stream = _native.stream
    claim, pin, unpin = _native.claim, _native.pin, _native.unpin
    # A job's result (OK, MISSING, DAMAGED, UNPUSHED, SKIPPED, TAKEN) and its state while the
    # stream runs (QUEUED, CLAIMED, READING, VERIFIED, RELEASING, DONE, FAILED).
    globals().update({k: v for k, v in vars(_native).items() if k.isupper()})


def fuse_fd() -> int | None:
    """The descriptor of this process's FUSE session (``/dev/fuse``), for :func:`store`; None if
    it is not exactly one or the C steps are off."""
    return session_fd() if NATIVE else None


def session_fd() -> int | None:
    """The descriptor of this process's FUSE session (``/dev/fuse``); None if it is not exactly
    one (pyfuse3 does not expose the one it holds)."""
    found = []
    try:
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                    found.append(int(name))
            except OSError:
                continue
    except OSError:
        return None
    return found[0] if len(found) == 1 else None
