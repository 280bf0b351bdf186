"""How a chunk is stored: as its own bytes, or smaller, as a frame of its bytes grouped and
compressed (docs/adr/0022-compressed-chunks.md).

A chunk's id is the blake3 of its bytes whichever way it is stored, and its key in the store is
the same, so dedup and gc do not change.  Readers tell the two apart by what they got::

    the object's length is the chunk's size and its blake3 is the id   -> the bytes themselves
    otherwise, it starts with FRAME_MAGIC                              -> a frame: decode, check

A frame is stored only when it is at least :data:`MIN_SAVING` smaller than the chunk, so a frame is
never as long as the chunk it holds, and a raw chunk that happens to start with the magic is still
recognised first by its hash.  Frame layout (8-byte header, then one zstd frame)::

    b"MLZ\\x01"  typesize (1 byte: 1, 2 or 4)  3 zero bytes  zstd frame of the grouped bytes

*Grouped* is the byte-grouping (shuffle) Blosc and Xet use (in C, ``mlfs/_shuffle.c``, where the
package was built with a compiler; in bytes slicing otherwise): with a typesize of 4, every
element's first byte, then every second byte, and so on.  The bytes that hold a float's sign and exponent are
few-valued, and grouped they compress; interleaved with the mantissa's near-random bytes they do
not.  Measured on 4 MiB pieces (zstd level 1): fp32 N(0,1) 0.84 of its size, bf16 weights with
σ=0.02 0.68, random fp16 bit patterns 1.00 (stored as they are); without grouping 0.92, 0.78.

Everything read back is untrusted: the frame's declared content size must equal the chunk's size
before anything is decompressed, decompression is bounded by it, and the result is checked
against the id.  Decoding allocates at most two chunk-sized buffers.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

FRAME_MAGIC = b"MLZ\x01"
HEADER = 8
TYPESIZES = (1, 2, 4)
#: A frame is stored only if it saves at least this share of the chunk (docs/adr/0022: below it the
#: decoding costs a reader more CPU than the bytes saved cost a 1 Gbit/s link).
MIN_SAVING = 1 / 16
#: zstd level 1: on weights it both compresses best and is fastest of levels 1-3 (ADR 0022).
LEVEL = 1
#: Bytes per sample slice when choosing a typesize.  Smaller samples chose badly: on MiniLM, 16 KiB
#: slices picked typesize 1 or 2 for 42 of 76 fp32 chunks and stored 0.875 of it, 64 KiB 0.834.
_SAMPLE = 64 << 10
_SMALL = 16 << 10  # chunks below this are stored as they are: too small to be worth a frame

_local = threading.local()


class FrameError(ValueError):
    """A stored object is neither the chunk nor a valid frame of it."""


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _group_py(data: bytes | memoryview, typesize: int) -> bytes:
    """:func:`group` in bytes slicing (the fallback, and the C code's reference)."""
    whole = bytes(data)
    n = len(whole) // typesize
    body = whole[:n * typesize]
    return b"".join([body[k::typesize] for k in range(typesize)] + [whole[n * typesize:]])


def _ungroup_py(grouped: bytes, typesize: int) -> bytes:
    """:func:`ungroup` in ``bytearray`` slice assignment (the fallback, and the C code's
    reference)."""
    size = len(grouped)
    n = size // typesize
    src = memoryview(grouped)
    out = bytearray(size)
    for k in range(typesize):
        out[k:n * typesize:typesize] = src[k * n:(k + 1) * n]
    out[n * typesize:] = src[n * typesize:]
    return bytes(out)


try:  # the same in C, ~20x faster and without the GIL (mlfs/_shuffle.c); optional
    from ._shuffle import group as _group_c, ungroup as _ungroup_c
except ImportError:  # pragma: no cover - a build without a C compiler
    _group_c = _ungroup_c = None


def group(data: bytes | memoryview, typesize: int) -> bytes:
    """Every element's byte 0, then every byte 1, ... (a tail shorter than an element is kept
    last, as it is)."""
    if typesize == 1:
        return bytes(data)
    return _group_c(data, typesize) if _group_c else _group_py(data, typesize)


def ungroup(grouped: bytes, typesize: int) -> bytes:
    """The inverse of :func:`group`."""
    if typesize == 1:
        return grouped
    return _ungroup_c(grouped, typesize) if _ungroup_c else _ungroup_py(grouped, typesize)


def _samples(data: memoryview) -> bytes:
    """Up to three slices (start, middle, end) of 64 KiB, at offsets that keep every element
    whole for each typesize tried."""
    size = len(data)
    if size <= 3 * _SAMPLE:
        return bytes(data)
    mid = (size // 2) // 8 * 8
    end = (size - _SAMPLE) // 8 * 8
    return bytes(data[:_SAMPLE]) + bytes(data[mid:mid + _SAMPLE]) + bytes(data[end:end + _SAMPLE])


def choose_typesize(data: bytes | memoryview) -> tuple[int, float]:
    """The typesize whose grouping compresses a sample of *data* best, and the sample's ratio."""
    sample = _samples(memoryview(data))
    c = _compressor()
    best = (1, 1.0)
    for ts in TYPESIZES:
        ratio = len(c.compress(group(sample, ts))) / len(sample)
        if ratio < best[1]:
            best = (ts, ratio)
    return best


def encode(data: bytes | memoryview) -> bytes | None:
    """A frame of *data* if it saves at least :data:`MIN_SAVING`, else None (store it as is)."""
    size = len(data)
    if size < _SMALL:
        return None
    ts, ratio = choose_typesize(data)
    if ratio > 1 - MIN_SAVING * 0.75:  # the sample says it will not pay: skip the full pass
        return None
    body = _compressor().compress(group(data, ts))
    if HEADER + len(body) > size * (1 - MIN_SAVING):
        return None
    return FRAME_MAGIC + bytes((ts, 0, 0, 0)) + body


def decode(frame: bytes | memoryview, size: int) -> bytes:
    """The chunk of *size* bytes held by *frame*; FrameError if it is not a valid frame of
    exactly that size (it is not checked against an id here: see :func:`verified`)."""
    frame = memoryview(frame)
    if len(frame) < HEADER + 4 or bytes(frame[:4]) != FRAME_MAGIC:
        raise FrameError("not an mlfs frame")
    ts = frame[4]
    if ts not in TYPESIZES or bytes(frame[5:8]) != b"\0\0\0":
        raise FrameError(f"unknown frame parameters {bytes(frame[4:8]).hex()}")
    body = frame[HEADER:]
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise FrameError(f"bad zstd frame: {e}") from None
    if declared != size:
        raise FrameError(f"frame holds {declared} bytes, expected {size}")
    try:
        grouped = _decompressor().decompress(body, max_output_size=size)
    except zstandard.ZstdError as e:
        raise FrameError(f"bad zstd frame: {e}") from None
    if len(grouped) != size:
        raise FrameError(f"frame decoded to {len(grouped)} bytes, expected {size}")
    return ungroup(grouped, ts)


def verified(chunk_id: str, body: bytes, size: int | None, max_size: int) -> bytes | None:
    """The chunk's bytes from a stored object *body* (the chunk itself or a frame of it), checked
    against *chunk_id* (and *size* where a manifest tells it); None if *body* is neither."""
    if (size is None or len(body) == size) and len(body) <= max_size \
            and blake3.blake3(body).hexdigest() == chunk_id:
        return body
    if size is not None and not len(body) < size:
        return None
    if body[:4] != FRAME_MAGIC or len(body) < HEADER + 4:
        return None
    if size is None:  # a caller without a manifest (mlfs serve): the frame says, within bounds
        try:
            size = zstandard.frame_content_size(memoryview(body)[HEADER:])
        except zstandard.ZstdError:
            return None
        if not 0 < size <= max_size:
            return None
    try:
        data = decode(body, size)
    except FrameError:
        return None
    return data if blake3.blake3(data).hexdigest() == chunk_id else None
