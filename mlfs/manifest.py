"""Manifests: one model version as files made of content-addressed chunks.

A manifest is untrusted input (it may come from a shared store or a CI artifact), so ``loads``
validates everything before anything else sees it: paths are normalised relative paths without
``..``, duplicates or file/directory clashes; sizes are the sums of their chunks; numbers are bounded.
This module does no I/O beyond bytes in and bytes out.

Format ``mlfs.manifest/1`` (JSON Schema: ``manifests/mlfs.manifest-1.schema.json``)::

    {"format": "mlfs.manifest/1", "id": "minilm", "version": "v2",
     "created": "2026-11-23T01:02:03Z", "store": "s3://bucket/prefix",     # store is a hint only
     "metadata": {"library": "transformers", "description": "...", "tags": ["nlp"],
                  "derived_from": "v1", "extra": {"key": "value"}},
     "prefetch": ["config.json", "tokenizer*"],
     "files": [{"path": "model.safetensors", "size": 1234, "mode": 420,
                "blake3": "<64 hex>", "chunks": [["<64 hex>", 1000], ["<64 hex>", 234]],
                "tensors": {"embeddings.weight": [1000, 1234, "<16 hex>"]}}],
     "digest": "blake3:<64 hex>"}

``tensors`` maps a tensor name to ``[begin, end, short_hash]`` in *file* offsets; the short hash is
the first 16 hex digits of the blake3 of the tensor's bytes, used by ``diff``.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import accumulate
from typing import Any, Iterable

import blake3

from .config import MAX_CHUNK_SIZE
from .errors import ManifestError

FORMAT = "mlfs.manifest/1"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
MAX_FILES = 1_000_000
MAX_CHUNKS = 50_000_000
MAX_FILE_SIZE = 1 << 50
MAX_PATH = 4096


@dataclass(slots=True)
class FileEntry:
    """One regular file. ``chunk_ids[i]`` covers ``[offsets[i], offsets[i] + chunk_sizes[i])``."""

    path: str
    size: int
    mode: int
    blake3: str
    chunk_ids: list[str]
    chunk_sizes: list[int]
    tensors: dict[str, tuple[int, int, str]] | None = None
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.offsets:
            self.offsets = [0, *accumulate(self.chunk_sizes)][:-1] if self.chunk_sizes else []

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mode": self.mode,
            "blake3": self.blake3,
            "chunks": [[c, s] for c, s in zip(self.chunk_ids, self.chunk_sizes)],
        }
        if self.tensors is not None:
            doc["tensors"] = {k: list(v) for k, v in self.tensors.items()}
        return doc


@dataclass(slots=True)
class Manifest:
    id: str
    version: str
    files: list[FileEntry]
    created: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    prefetch: list[str] = field(default_factory=list)
    store: str | None = None
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.created:
            self.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def logical_size(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_sizes(self) -> dict[str, int]:
        """Every distinct chunk the version references, with its size."""
        out: dict[str, int] = {}
        for f in self.files:
            out.update(zip(f.chunk_ids, f.chunk_sizes))
        return out

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "id": self.id,
            "version": self.version,
            "created": self.created,
            "metadata": self.metadata,
            "prefetch": self.prefetch,
            "files": [f.to_json() for f in self.files],
        }
        if self.store:
            doc["store"] = self.store
        return doc

    def dumps(self) -> bytes:
        """Serialise with a freshly computed digest (also stored in ``self.digest``)."""
        doc = self.to_json()
        self.digest = compute_digest(doc)
        doc["digest"] = self.digest
        return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def compute_digest(doc: dict[str, Any]) -> str:
    """``blake3:<hex>`` of the canonical JSON of *doc* without its ``digest`` member."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "blake3:" + blake3.blake3(canon.encode()).hexdigest()


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ManifestError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit")
    return value


def check_path(path: object) -> str:
    """Accept only a normalised relative POSIX path; return it unchanged."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"invalid file path {path!r}")
    if "\0" in path:
        raise ManifestError(f"invalid file path {path!r}: contains a NUL byte")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise ManifestError(f"invalid file path {path[:60]!r}...: longer than {MAX_PATH} bytes")
    if path.startswith("/"):
        raise ManifestError(f"invalid file path {path!r}: absolute paths are not allowed")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ManifestError(
                f"invalid file path {path!r}: empty, '.' or '..' components are not allowed")
        if len(part.encode("utf-8", "surrogatepass")) > 255:
            raise ManifestError(f"invalid file path {path!r}: a component is over 255 bytes")
    return path


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ManifestError(f"invalid {what}: {value!r} (expected an integer in [{lo}, {hi}])")
    return value


def _parse_file(doc: object, index: int) -> FileEntry:
    if not isinstance(doc, dict):
        raise ManifestError(f"files[{index}] is not an object")
    path = check_path(doc.get("path"))
    size = _int(doc.get("size"), f"size of {path}", 0, MAX_FILE_SIZE)
    mode = _int(doc.get("mode", 0o644), f"mode of {path}", 0, 0o777)
    digest = doc.get("blake3")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ManifestError(f"invalid blake3 of {path}: {digest!r}")
    chunks = doc.get("chunks")
    if not isinstance(chunks, list):
        raise ManifestError(f"chunks of {path} is not a list")
    ids: list[str] = []
    sizes: list[int] = []
    hex64 = _HEX64.fullmatch
    for ref in chunks:
        if (not isinstance(ref, list) or len(ref) != 2 or not isinstance(ref[0], str)
                or not hex64(ref[0]) or type(ref[1]) is not int
                or not 0 < ref[1] <= MAX_CHUNK_SIZE):
            raise ManifestError(f"invalid chunk reference in {path}: {str(ref)[:100]}")
        ids.append(ref[0])
        sizes.append(ref[1])
    total = sum(sizes)
    if total != size:
        raise ManifestError(f"size of {path} is {size} but its chunks add up to {total}")
    tensors = None
    raw = doc.get("tensors")
    if raw is not None:
        if not isinstance(raw, dict):
            raise ManifestError(f"tensors of {path} is not an object")
        tensors = {}
        for name, rng in raw.items():
            if (not isinstance(rng, list) or len(rng) != 3 or type(rng[0]) is not int
                    or type(rng[1]) is not int or not 0 <= rng[0] <= rng[1] <= size
                    or not isinstance(rng[2], str) or not _HEX16.fullmatch(rng[2])):
                raise ManifestError(f"invalid range of tensor {name!r} in {path}: {str(rng)[:100]}")
            tensors[name] = (rng[0], rng[1], rng[2])
    return FileEntry(path, size, mode, digest, ids, sizes, tensors)


def from_json(doc: object) -> Manifest:
    """Validate a decoded manifest document and build a :class:`Manifest`."""
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"unsupported manifest format {fmt!r} (this mlfs reads {FORMAT!r})")
    mid = check_name("model id", doc.get("id"))
    version = check_name("version", doc.get("version"))
    created = doc.get("created", "")
    if not isinstance(created, str):
        raise ManifestError("invalid 'created': not a string")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ManifestError("invalid 'metadata': not an object")
    tags = metadata.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ManifestError("invalid metadata 'tags': not a list of strings")
    prefetch = doc.get("prefetch", [])
    if not isinstance(prefetch, list) or not all(isinstance(p, str) for p in prefetch):
        raise ManifestError("invalid 'prefetch': not a list of strings")
    store = doc.get("store")
    if store is not None and not isinstance(store, str):
        raise ManifestError("invalid 'store': not a string")
    files_doc = doc.get("files")
    if not isinstance(files_doc, list):
        raise ManifestError("invalid 'files': not a list")
    if len(files_doc) > MAX_FILES:
        raise ManifestError(f"too many files ({len(files_doc)} > {MAX_FILES})")
    files = [_parse_file(f, i) for i, f in enumerate(files_doc)]
    _check_tree(files)
    if sum(len(f.chunk_ids) for f in files) > MAX_CHUNKS:
        raise ManifestError(f"too many chunk references (> {MAX_CHUNKS})")
    digest = compute_digest(doc)
    claimed = doc.get("digest")
    if claimed is not None and claimed != digest:
        raise ManifestError(f"manifest digest mismatch: it claims {claimed!r}, content is {digest}")
    return Manifest(mid, version, files, created, metadata, prefetch, store, digest)


def _check_tree(files: Iterable[FileEntry]) -> None:
    paths: set[str] = set()
    dirs: set[str] = set()
    for f in files:
        if f.path in paths:
            raise ManifestError(f"duplicate file path {f.path!r}")
        paths.add(f.path)
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    clash = paths & dirs
    if clash:
        raise ManifestError(f"{sorted(clash)[0]!r} is both a file and a directory")


def loads(data: bytes | str) -> Manifest:
    """Parse and validate manifest bytes; raise :class:`ManifestError` with a one-line reason."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    return from_json(doc)


def parse_ref(ref: str) -> tuple[str, str]:
    """``"ID@VERSION"`` → ``(id, version)``."""
    mid, sep, version = ref.partition("@")
    if not sep:
        raise ManifestError(f"invalid model reference {ref!r}: expected ID@VERSION")
    return check_name("model id", mid), check_name("version", version)


def same_content(a: Manifest, b: Manifest) -> bool:
    """True if two manifests publish the same version: everything equal but the creation time and
    the store hint (regenerating an unchanged model must be a no-op, not a conflict)."""
    def body(m: Manifest) -> dict[str, Any]:
        doc = m.to_json()
        doc.pop("created", None)
        doc.pop("store", None)
        return doc
    return body(a) == body(b)


def match_prefetch(patterns: list[str], path: str) -> bool:
    """True if *path* matches a prefetch pattern (fnmatch; ``all`` or ``*`` match everything)."""
    return any(p in ("all", "*") or fnmatch.fnmatchcase(path, p)
               or fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], p) for p in patterns)
