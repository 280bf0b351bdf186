"""Where weight files other than safetensors have their tensors: GGUF and PyTorch zip checkpoints.

Each parser reads only the file's own structure (never executes anything) and returns a
:class:`Layout`: chunk spans cut along that structure, so a changed tensor costs its own pieces and
a change elsewhere (GGUF metadata, a zip entry's header) moves no tensor's chunks; plus the tensor
table the manifest records (name, exact byte range).  A header that lies — offsets past the end,
overlapping tensors, absurd counts — raises :class:`~mlfs.chunking.HeaderError`, and the caller
falls back to fixed pieces: a model is never refused and bytes are always stored exactly.

- **GGUF** (llama.cpp, Ollama; versions 2 and 3): the preamble and each key/value are regions of
  the header, cut with the ``pack`` rule so a metadata edit costs the small entries around it and
  large arrays (the tokenizer's vocabulary) keep their chunks; the tensor-info block is one more
  region.  Tensor data starts at the aligned offset after it; each tensor is a region from its
  offset to the next tensor's (alignment padding belongs to the tensor before it), cut like a
  safetensors tensor.  Tensor offsets are relative to the data start, so an edit that shifts the
  data start shifts no tensor's chunks.
- **PyTorch zip** (``torch.save``'s default since 1.6): each entry's local header and each entry's
  bytes are regions (``archive/data/<key>`` holds one storage), cut with the ``pack`` rule: torch
  pads headers so data starts 64-byte aligned, so one more tensor changes every header after it,
  and a header must never share a chunk with a large storage's bytes.  Entries
  must be stored, not compressed (torch writes them so).  Storage names come from ``data.pkl``
  read with :mod:`pickletools` — opcodes listed, never run — where a tensor's name precedes its
  ``_rebuild_tensor`` call and its storage key follows ``'storage'`` in the persistent id; a
  storage no name can be found for keeps its entry name.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from dataclasses import dataclass

from .chunking import PACK_LIMIT, HeaderError, region_spans

#: Limits that protect memory and time against hostile headers.
MAX_ITEMS = 1 << 20
MAX_DIMS = 8
MAX_PICKLE = 256 << 20


@dataclass
class Layout:
    kind: str
    spans: list[tuple[int, int]]
    tensors: list[tuple[str, int, int]]  # name, begin, end: the tensor's exact bytes


# -- GGUF ----------------------------------------------------------------------------------------
GGUF_MAGIC = b"GGUF"
#: ggml type → (elements per block, bytes per block), as in gguf-py's GGML_QUANT_SIZES (the tests
#: compare the two).  A type not listed ends at the next tensor's offset.
GGML_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
              8: (32, 34), 9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144),
              13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
              18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
              23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
              29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
              40: (64, 36), 41: (128, 18)}
#: GGUF value type → fixed size in bytes (8: string, 9: array are variable).
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Reader:
    def __init__(self, data, size: int) -> None:
        self.data = data
        self.size = size
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"GGUF header runs past the end of the file (at byte {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR:
            self.take(_SCALAR[vtype])
        elif vtype == 8:
            self.string()
        elif vtype == 9 and depth < 2:
            etype, count = self.u32(), self.u64()
            if etype in _SCALAR:
                self.take(_SCALAR[etype] * count)
            elif count > self.size:
                raise HeaderError(f"GGUF array of {count} items in a {self.size}-byte file")
            else:
                for _ in range(count):
                    self.skip_value(etype, depth + 1)
        else:
            raise HeaderError(f"GGUF value of unknown type {vtype}")


def parse_gguf(data, size: int) -> Layout:
    """The layout of a GGUF file (see the module doc).  Raises HeaderError."""
    r = _Reader(data, size)
    if r.take(4) != GGUF_MAGIC:
        raise HeaderError("not a GGUF file")
    version = r.u32()
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > MAX_ITEMS or n_kv > MAX_ITEMS:
        raise HeaderError(f"GGUF claims {n_tensors} tensors and {n_kv} keys")
    header_regions: list[tuple[int, int]] = []
    alignment = 32
    for _ in range(n_kv):
        begin = r.pos
        key = r.string()
        vtype = r.u32()
        value_at = r.pos
        r.skip_value(vtype)
        if key == b"general.alignment" and vtype in (4, 5):  # uint32 (int32 seen in the wild)
            alignment = struct.unpack("<I", data[value_at:value_at + 4])[0]
        header_regions.append((begin, r.pos))
    if header_regions:  # the preamble (magic, counts) goes with the first entry
        header_regions[0] = (0, header_regions[0][1])
    if alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise HeaderError(f"GGUF alignment {alignment} is not a power of two up to 1 MiB")
    infos_begin = r.pos
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > MAX_DIMS:
            raise HeaderError(f"GGUF tensor with {n_dims} dimensions")
        dims = [r.u64() for _ in range(n_dims)]
        ttype, offset = r.u32(), r.u64()
        infos.append((name.decode("utf-8", "replace"), dims, ttype, offset))
    data_start = -(-r.pos // alignment) * alignment
    if data_start > size:
        raise HeaderError("GGUF tensor data starts past the end of the file")
    infos_end = r.pos
    header_regions.append((infos_begin if header_regions else 0, infos_end))
    spans = region_spans(header_regions, 0, infos_end, policy="pack", pack_limit=PACK_LIMIT)
    if data_start > infos_end:
        # The padding to the data start is a chunk of its own: its length follows the metadata's,
        # and glued to the tensor infos it would make them new on every metadata edit.
        spans.append((infos_end, data_start))

    tensors = []
    for name, dims, ttype, offset in infos:
        begin = data_start + offset
        if begin > size:
            raise HeaderError(f"GGUF tensor {name!r} starts past the end of the file")
        nbytes = None
        if ttype in GGML_SIZES:
            block, bsize = GGML_SIZES[ttype]
            n = 1
            for d in dims:
                n *= d
            if n % block:
                raise HeaderError(f"GGUF tensor {name!r}: {n} elements in blocks of {block}")
            nbytes = n // block * bsize
            if begin + nbytes > size:
                raise HeaderError(f"GGUF tensor {name!r} runs past the end of the file")
        tensors.append([name, begin, nbytes])
    tensors.sort(key=lambda t: t[1])
    regions = []
    for i, t in enumerate(tensors):
        nxt = tensors[i + 1][1] if i + 1 < len(tensors) else size
        if t[2] is None:
            t[2] = nxt - t[1]  # an unknown type: up to the next tensor
        end = t[1] + t[2]
        if end > nxt:
            raise HeaderError(f"GGUF tensors {t[0]!r} and {tensors[i + 1][0]!r} overlap")
        regions.append((t[1], nxt))  # the padding after a tensor goes with it
    spans += region_spans(regions, data_start, size)
    return Layout("gguf", spans, [(name, b, b + n) for name, b, n in tensors])


# -- PyTorch zip checkpoints -------------------------------------------------------------------
def parse_torch_zip(data, size: int) -> Layout:
    """The layout of a ``torch.save`` zip checkpoint (see the module doc).  Raises HeaderError."""
    try:
        zf = zipfile.ZipFile(_View(data, size))
        infos = zf.infolist()
    except Exception as e:  # noqa: BLE001 - zipfile raises many types on hostile input
        raise HeaderError(f"not a readable zip: {type(e).__name__}: {e}") from None
    if len(infos) > MAX_ITEMS:
        raise HeaderError(f"zip with {len(infos)} entries")
    pkl = next((i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"),
               None)
    if pkl is None:
        raise HeaderError("a zip without data.pkl is not a PyTorch checkpoint")
    entries = []
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise HeaderError(f"zip entry {info.filename} is compressed")
        h = info.header_offset
        local = data[h:h + 30]
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise HeaderError(f"zip entry {info.filename}: no local header at {h}")
        n, e = struct.unpack("<HH", local[26:30])
        begin = h + 30 + n + e
        end = begin + info.compress_size
        if end > size:
            raise HeaderError(f"zip entry {info.filename} runs past the end of the file")
        entries.append((h, begin, end, info.filename))
    entries.sort()
    for a, b in zip(entries, entries[1:]):
        if b[0] < a[2]:
            raise HeaderError(f"zip entries {a[3]} and {b[3]} overlap")
    names = _storage_names(data[_data_of(entries, pkl.filename)])
    prefix = pkl.filename[:-len("data.pkl")]
    tensors = []
    for h, begin, end, fname in entries:
        if fname.startswith(prefix + "data/"):
            key = fname[len(prefix) + 5:]
            tensors.append((names.get(key, fname), begin, end))
    # Headers and data are regions of their own.  torch pads every entry's local header so that
    # its data starts at a multiple of 64 in the file: when data.pkl grows (one more tensor), every
    # header after it changes.  So a header never shares a chunk with a large entry's data: it
    # goes with the small entries and headers around it ("pack"), and each large entry's pieces
    # count from its data's first byte.  The data descriptor after an entry goes with the next
    # header; the central directory (every entry's CRC) is last.
    cd = getattr(zf, "start_dir", size)
    if not entries[-1][2] <= cd <= size:
        raise HeaderError("zip central directory overlaps its entries")
    regions = []
    pos = 0
    for h, begin, end, _ in entries:
        regions += [(pos, begin), (begin, end)]
        pos = end
    spans = region_spans(regions, 0, size, policy="pack", pack_limit=PACK_LIMIT)
    return Layout("torch-zip", spans, tensors)


def _data_of(entries, fname: str) -> slice:
    for _, begin, end, name in entries:
        if name == fname:
            if end - begin > MAX_PICKLE:
                raise HeaderError("data.pkl is too large")
            return slice(begin, end)
    raise HeaderError("data.pkl not found")


def _storage_names(pickle_bytes: bytes) -> dict[str, str]:
    """Storage key → tensor name(s), from the opcodes of ``data.pkl`` (nothing is executed).

    A minimal model of the pickle machine that follows only strings and globals, through the memo
    (torch memoizes ``'storage'`` and ``_rebuild_tensor_v2``, so from the second tensor on they
    come back by ``BINGET``): a tensor's name is the string pushed right before its rebuild
    function; its storage key is the first string after ``'storage'`` and the storage type.
    Whatever cannot be read leaves keys unnamed.
    """
    names: dict[str, list[str]] = {}
    memo: dict[int, object] = {}
    strings: list[str] = []
    last: object = None
    pending: str | None = None  # name of the tensor being rebuilt
    state = 0  # 1: saw 'storage', 2: saw the storage type: the next string is the key

    def pushed(value: object) -> None:
        nonlocal last, pending, state
        last = value
        if isinstance(value, tuple):  # a global
            if "_rebuild_tensor" in value[0] or "_rebuild_parameter" in value[0]:
                if strings and pending is None:
                    pending = strings[-1]
            if state == 1:
                state = 2
            return
        if not isinstance(value, str):
            return
        if state == 2:
            names.setdefault(value, [])
            if pending and pending not in names[value]:
                names[value].append(pending)
            pending, state = None, 0
        elif value == "storage":
            state = 1
        strings.append(value)
        del strings[:-8]

    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(bytes(pickle_bytes))):
            name = op.name
            if name == "GLOBAL":
                pushed((str(arg),))
            elif name == "STACK_GLOBAL":
                module, attr = (strings[-2:] + ["", ""])[:2]
                del strings[-2:]
                pushed((f"{module} {attr}",))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = last
            elif name == "MEMOIZE":
                memo[len(memo)] = last
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed(memo.get(int(arg)))
            elif isinstance(arg, str) and name.endswith(("UNICODE", "STRING")):
                pushed(arg)
            else:
                last = None
    except (ValueError, IndexError, KeyError, EOFError, struct.error, UnicodeDecodeError):
        pass  # an unreadable pickle: storages keep their entry names
    return {k: ", ".join(v) for k, v in names.items() if v}


class _View(io.RawIOBase):
    """A read-only file over a bytes-like object (an mmap) for :mod:`zipfile`, without a copy."""

    def __init__(self, data, size: int) -> None:
        self._data = data
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        chunk = self._data[self._pos:self._pos + len(b)]
        b[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def layout(rel: str, data, size: int) -> Layout | None:
    """The structured layout of a GGUF or PyTorch zip file, None for other files.  Raises
    HeaderError when the file claims a format but its structure cannot be trusted."""
    head = bytes(data[:4]) if size >= 4 else b""
    if head == GGUF_MAGIC:
        return parse_gguf(data, size)
    if head == b"PK\x03\x04" and rel.lower().endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
        return parse_torch_zip(data, size)
    return None
