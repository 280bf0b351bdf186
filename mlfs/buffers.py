"""New ``bytes`` objects filled in place by the kernel (a socket's ``recv_into``, a file's
``preadv``), without zeroing them first.

``bytearray(n)`` writes *n* zero bytes before the kernel overwrites them all: a memset, and a page
fault per fresh page, ~12% of the mount's CPU in a cold load and ~8% in a warm one here
(docs/adr/0020).  :func:`unfilled` does what C code does with ``PyBytes_FromStringAndSize(NULL,
n)``: the object is written through a view of its storage before anyone else sees it, and the
caller hands out the ``bytes`` (immutable from then on) — also what every reader of a chunk
expects.
"""

from __future__ import annotations

import ctypes

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def unfilled(n: int) -> tuple[bytes, memoryview, int]:
    """A new ``bytes`` of *n* bytes (*n* ≥ 2), not yet filled; a writable view of its storage,
    to be released before the object is handed out; and the storage's address.  Until every
    byte is written the object holds whatever malloc left there, so the caller must fill it or
    drop it."""
    if n < 2:  # CPython shares its empty and one-byte objects
        raise ValueError("unfilled() needs at least 2 bytes")
    obj = _new_bytes(None, n)
    address = _bytes_address(obj)
    return obj, memoryview((ctypes.c_char * n).from_address(address)).cast("B"), address
