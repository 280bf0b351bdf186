"""Where a file is cut into chunks.

A chunk id is the blake3 of its bytes, so identical bytes cut at identical boundaries are stored
once.  The boundaries therefore decide the dedup: we cut a safetensors file where its structure is
(the header, then each tensor), because fine-tunes change whole tensors and leave others alone.

- The header (8-byte length + JSON) is one chunk of its own.
- A tensor larger than ``piece_size`` is cut into ``piece_size`` pieces counted from the tensor's own
  start, so an embedding that grew by appended rows still shares all its old full pieces.
- A large tensor's first 512 KiB (its *head*) and last 256 KiB (its *tail*) are split off its
  first and last pieces as chunks of their own, so the kernel's read-ahead spilling from one
  tensor into its neighbours costs an edge, not a 4 MiB piece, and a reader that takes a few
  tensors fetches about what it reads (docs/adr/0018-edges-and-lean-start.md).
- Consecutive tensors smaller than ``small`` are packed into one chunk up to ``pack_limit`` bytes:
  a BERT layer has a dozen 1.5 KB LayerNorm/bias tensors and every chunk costs a store request.
  Packs end at every large tensor, so a pack holds the small tensors of one layer and still
  dedups at layer granularity (measured in docs/adr/0001-chunking.md).
- Any other file, or a safetensors file whose header we reject, is cut into fixed pieces.

Everything here is pure: bytes/sizes in, spans out.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from .config import EDGE_HEAD, EDGE_TAIL, GENERIC_PIECE_SIZE, PACK_LIMIT, PIECE_SIZE, SMALL_POLICY, \
    SMALL_TENSOR

MAX_HEADER = 100 << 20


class HeaderError(ValueError):
    """The bytes do not start with a safetensors header we can trust."""


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    begin: int  # file offsets
    end: int


def parse_safetensors_header(prefix: bytes, file_size: int) -> tuple[int, list[Tensor]]:
    """Parse the header at the start of a safetensors file.

    *prefix* must hold at least the first ``8 + header_len`` bytes (``header_length`` tells how many).
    Returns ``(data_start, tensors sorted by offset)``.  Raises :class:`HeaderError` for anything a
    loader would reject or that would make our cut points wrong: bad length, bad JSON, offsets out
    of range, overlapping tensors.
    """
    n = header_length(prefix, file_size)
    if len(prefix) < 8 + n:
        raise HeaderError("header truncated")
    try:
        doc = json.loads(prefix[8:8 + n])
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"header is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    data_start = 8 + n
    data_size = file_size - data_start
    tensors = []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise HeaderError(f"tensor {name!r}: not an object")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs) or not 0 <= offs[0] <= offs[1] <= data_size):
            raise HeaderError(f"tensor {name!r}: bad data_offsets {offs!r}")
        tensors.append(Tensor(name, data_start + offs[0], data_start + offs[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    for a, b in zip(tensors, tensors[1:]):
        if b.begin < a.end:
            raise HeaderError(f"tensors {a.name!r} and {b.name!r} overlap")
    return data_start, tensors


def header_length(prefix: bytes, file_size: int) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError("file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER or 8 + n > file_size:
        raise HeaderError(f"header length {n} does not fit a {file_size}-byte file")
    return n


def fixed_spans(begin: int, end: int, piece: int) -> list[tuple[int, int]]:
    """Cut ``[begin, end)`` into pieces of *piece* bytes counted from *begin*."""
    return [(o, min(o + piece, end)) for o in range(begin, end, piece)]


def region_pieces(begin: int, end: int, piece: int,
                  edges: tuple[int, int] = (0, 0)) -> list[tuple[int, int]]:
    """The pieces of one large region: *piece*-sized pieces counted from its start (so rows
    appended to a tensor leave all its earlier full pieces shared), and with ``edges = (head,
    tail)`` its first *head* bytes and its last *tail* bytes split off as pieces of their own.
    The split points lie on the same grid as without edges, so edges cost dedup nothing but
    the tail that changes with the last piece.  A last piece of at most twice *tail* is left
    whole (the tail would only split off a sliver)."""
    pieces = fixed_spans(begin, end, piece)
    head, tail = edges
    if head <= 0 or end - begin <= head + 2 * tail:
        return pieces
    a, b = pieces[0]
    if b - a > head:
        pieces[0:1] = [(a, a + head), (a + head, b)]
    a, b = pieces[-1]
    if tail > 0 and b - a > 2 * tail:
        pieces[-1:] = [(a, b - tail), (b - tail, b)]
    return pieces


def generic_spans(size: int, piece: int = GENERIC_PIECE_SIZE) -> list[tuple[int, int]]:
    return fixed_spans(0, size, piece)


def safetensors_spans(data_start: int, tensors: list[Tensor], file_size: int, *,
                      piece: int = PIECE_SIZE, small: int = SMALL_TENSOR,
                      pack_limit: int = PACK_LIMIT, policy: str = SMALL_POLICY,
                      edges: tuple[int, int] = (EDGE_HEAD, EDGE_TAIL)) -> list[tuple[int, int]]:
    """Chunk spans covering ``[0, file_size)`` for a parsed safetensors file (see module doc):
    the header, then :func:`region_spans` over the tensors."""
    spans: list[tuple[int, int]] = [(0, data_start)]
    _cut(spans, data_start, [(t.begin, t.end) for t in tensors], file_size, piece=piece,
         small=small, pack_limit=pack_limit, policy=policy, edges=edges)
    return spans


def region_spans(regions: list[tuple[int, int]], begin: int, end: int, *,
                 piece: int = PIECE_SIZE, small: int = SMALL_TENSOR,
                 pack_limit: int = PACK_LIMIT, policy: str = SMALL_POLICY,
                 edges: tuple[int, int] = (EDGE_HEAD, EDGE_TAIL)) -> list[tuple[int, int]]:
    """Chunk spans covering ``[begin, end)`` where *regions* (sorted, disjoint, inside it) are the
    units that change together — tensors, a GGUF key/value, a zip entry.

    *policy* says what happens to a run of consecutive regions smaller than *small*:
    ``"separate"`` gives each its own chunk, ``"pack"`` puts the run in one chunk (at most
    *pack_limit* bytes), ``"glue"`` prepends the run to the first piece of the next large region
    (or appends it to the last piece of the previous one at the end).  A region of *small* or more
    is cut into *piece*-sized pieces counted from its own start, with its head and tail split
    off (*edges*, see :func:`region_pieces`).  Bytes outside every region are cut into fixed
    pieces of their own.
    """
    spans: list[tuple[int, int]] = []
    _cut(spans, begin, regions, end, piece=piece, small=small, pack_limit=pack_limit,
         policy=policy, edges=edges)
    return spans


def _cut(spans: list[tuple[int, int]], pos: int, regions: list[tuple[int, int]], end: int, *,
         piece: int, small: int, pack_limit: int, policy: str,
         edges: tuple[int, int] = (0, 0)) -> None:
    """Append to *spans* the spans covering ``[pos, end)`` (spans already there are never
    glued to)."""
    protected = len(spans)
    run_start: int | None = None  # start of the pending run of small regions

    def flush_run(at: int) -> None:
        nonlocal run_start
        if run_start is not None and at > run_start:
            spans.append((run_start, at))
        run_start = None

    for begin, stop in regions:
        if begin > pos:  # bytes no region claims (a gap safetensors would not write): keep them
            flush_run(pos)
            spans.extend(fixed_spans(pos, begin, piece))
            pos = begin
        size = stop - begin
        if size == 0:
            continue
        if size < small and policy != "separate":
            if run_start is not None and stop - run_start > pack_limit:
                flush_run(begin)
            if run_start is None:
                run_start = begin
            pos = stop
            continue
        if size < small:
            spans.append((begin, stop))
            pos = stop
            continue
        pieces = region_pieces(begin, stop, piece, edges)
        if policy == "glue" and run_start is not None:
            pieces[0] = (run_start, pieces[0][1])
            run_start = None
        flush_run(begin)
        spans.extend(pieces)
        pos = stop
    if (policy == "glue" and run_start is not None and len(spans) > protected
            and spans[-1][1] == run_start):
        spans[-1] = (spans[-1][0], pos)
        run_start = None
    flush_run(pos)
    if pos < end:
        spans.extend(fixed_spans(pos, end, piece))
