"""``generate``: a model directory → chunks in a store → a manifest, published last.

Each file is read once (mmap); chunk hashing, per-tensor hashing and uploads run in a thread pool
(blake3 and file/socket I/O release the GIL) while another thread streams the whole-file hash over the
same pages.  A chunk already in the store, or already handled in this run, is not uploaded again.
Only when every chunk is stored and ``store.sync()`` made them durable is the manifest written, so a
crash at any point never leaves a manifest naming a missing chunk.
"""

from __future__ import annotations

import fnmatch
import json
import mmap
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import blake3

from . import config
from . import manifest as mf
from .chunking import HeaderError, generic_spans, header_length, parse_safetensors_header, \
    safetensors_spans
from .errors import GenerateError
from .stores import Store

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5",
                   ".msgpack", ".npz", ".pb", ".tflite", ".ot")
SKIP_DIRS = {".git"}


@dataclass
class GenerateResult:
    manifest: mf.Manifest
    files: int = 0
    logical_bytes: int = 0
    chunks: int = 0
    unique_chunks: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def dedup_bytes(self) -> int:
        return self.logical_bytes - self.new_bytes


def scan_model_dir(model_dir: Path) -> list[tuple[str, Path, int, int]]:
    """``(relative posix path, real path, size, mode)`` of every regular file, sorted by path.

    Symlinks are followed (Hugging Face caches link snapshot files to blobs); anything that is not a
    regular file in the end is an error, as is a file we cannot stat.
    """
    if not model_dir.is_dir():
        raise GenerateError(f"model directory {model_dir} does not exist or is not a directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(model_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(model_dir).as_posix()
            try:
                st = full.stat()
            except OSError as e:
                raise GenerateError(f"cannot read {rel}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise GenerateError(f"cannot read {rel}: not a regular file")
            out.append((rel, full, st.st_size, stat.S_IMODE(st.st_mode) & 0o777))
    out.sort()
    return out


def plan_spans(rel: str, data: bytes | mmap.mmap, size: int) -> tuple[list[tuple[int, int]],
                                                                    list[tuple[str, int, int]] | None,
                                                                    str | None]:
    """Chunk spans (and tensors, for safetensors files) of one file, with a warning if any."""
    if rel.endswith(".safetensors"):
        try:
            n = header_length(data[:8], size)
            data_start, tensors = parse_safetensors_header(data[:8 + n], size)
        except HeaderError as e:
            return generic_spans(size), None, f"{rel}: not a valid safetensors file ({e}); stored as plain bytes"
        return (safetensors_spans(data_start, tensors, size),
                [(t.name, t.begin, t.end) for t in tensors], None)
    return generic_spans(size), None, None


def detect_metadata(model_dir: Path, names: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if "modules.json" in names:
        found["library"] = "sentence-transformers"
    elif "config.json" in names:
        try:
            cfg = json.loads((model_dir / "config.json").read_text())
            if isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg):
                found["library"] = "transformers"
        except (OSError, ValueError):
            pass
    if any(n.endswith(".safetensors") for n in names):
        found["framework"] = "safetensors"
    return found


def default_prefetch(entries: list[tuple[str, Path, int, int]]) -> list[str]:
    """Every small file that is not a weights file (config, tokenizer, vocab...)."""
    return [rel for rel, _, size, _ in entries
            if not rel.lower().endswith(WEIGHT_SUFFIXES) and size <= 16 << 20]


def build_metadata(given: dict[str, str], detected: dict[str, str]) -> dict:
    meta: dict = {"library": "", "framework": "", "description": "", "tags": [],
                  "derived_from": None, "extra": {}}
    meta.update({k: v for k, v in detected.items() if k in meta})
    for key, value in given.items():
        if key == "tags":
            meta["tags"] = [t.strip() for t in value.split(",") if t.strip()]
        elif key in ("library", "framework", "description", "derived_from"):
            meta[key] = value
        else:
            meta["extra"][key] = value
    return meta


def generate(model_dir: str | os.PathLike[str], store: Store, model_id: str, version: str, *,
             prefetch: list[str] | None = None, metadata: dict[str, str] | None = None,
             progress: Callable[[int], None] | None = None, threads: int = 8,
             publish: bool = True) -> GenerateResult:
    """Store every file of *model_dir* as chunks and publish the manifest ``model_id@version``.

    ``progress`` is called with the number of bytes processed after each chunk.
    Raises GenerateError for an unreadable model, StoreError for store failures; in both cases no
    manifest is published.
    """
    mf.check_name("model id", model_id)
    mf.check_name("version", version)
    root = Path(model_dir)
    entries = scan_model_dir(root)
    store.check()

    seen: dict[str, Future] = {}
    seen_lock = threading.Lock()
    counters = {"new_chunks": 0, "new_bytes": 0}
    count_lock = threading.Lock()
    # Bound memory held by queued tasks: each task holds a slice of an mmap, not a copy, but a
    # bounded queue also keeps the pool's work list short.
    slots = threading.BoundedSemaphore(threads * 8)

    touched: list[tuple[str, Path, int, int]] = []  # chunks that existed: (id, file, begin, end)
    last_touch = [0.0]

    def store_chunk(cid: str, view: memoryview, full: Path, a: int) -> None:
        if store.has_chunk(cid):
            # Renew its age so a concurrent gc does not collect it before our manifest exists.
            store.touch_chunk(cid)
            with count_lock:
                touched.append((cid, full, a, a + len(view)))
                last_touch[0] = time.monotonic()
            return
        store.put_chunk(cid, view)
        with count_lock:
            counters["new_chunks"] += 1
            counters["new_bytes"] += len(view)

    def chunk_task(data, a: int, b: int, full: Path) -> tuple[str, int]:
        try:
            with memoryview(data) as whole, whole[a:b] as view:
                return chunk_work(view, full, a)
        finally:
            slots.release()

    def chunk_work(view: memoryview, full: Path, a: int) -> tuple[str, int]:
        """Hash one chunk and store it unless this run or the store already has it."""
        cid = blake3.blake3(view).hexdigest()
        with seen_lock:
            fut = seen.get(cid)
            owner = fut is None
            if owner:
                fut = Future()
                seen[cid] = fut
        if owner:
            try:
                store_chunk(cid, view, full, a)
                fut.set_result(None)
            except BaseException as e:
                fut.set_exception(e)
                raise
        else:
            fut.result()
        if progress:
            progress(len(view))
        return cid, len(view)

    def tensor_hash(data, a: int, b: int) -> str:
        with memoryview(data) as whole, whole[a:b] as view:
            return blake3.blake3(view).hexdigest()[:16]

    def file_hash(data) -> str:
        h = blake3.blake3()
        step = 16 << 20
        with memoryview(data) as whole:
            for off in range(0, len(whole), step):
                with whole[off:off + step] as view:
                    h.update(view)
        return h.hexdigest()

    result_files: list[mf.FileEntry] = []
    warnings: list[str] = []
    total_chunks = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlfs-gen") as pool:
        for rel, full, size, mode in entries:
            try:
                fh = open(full, "rb")
            except OSError as e:
                raise GenerateError(f"cannot read {rel}: {e.strerror}") from None
            with fh:
                try:
                    data = _map(fh, size)
                except OSError as e:
                    raise GenerateError(f"cannot read {rel}: {e.strerror}") from None
                try:
                    spans, tensors, warning = plan_spans(rel, data, size)
                    if warning:
                        warnings.append(warning)
                    whole = pool.submit(file_hash, data)
                    futures = []
                    for a, b in spans:
                        slots.acquire()
                        futures.append(pool.submit(chunk_task, data, a, b, full))
                    tfuts = [(name, a, b, pool.submit(tensor_hash, data, a, b))
                             for name, a, b in tensors or []]
                    refs = [f.result() for f in futures]
                    tinfo = {name: (a, b, f.result()) for name, a, b, f in tfuts}
                    digest = whole.result()
                except OSError as e:  # an I/O error surfacing while the mapped pages are read
                    raise GenerateError(f"cannot read {rel}: {e.strerror or e}") from None
                finally:
                    if isinstance(data, mmap.mmap):
                        data.close()
            total_chunks += len(refs)
            result_files.append(mf.FileEntry(
                rel, size, mode, digest, [c for c, _ in refs], [s for _, s in refs],
                tinfo if tensors is not None else None))

    if touched and publish:
        _recheck_touched(store, touched, last_touch[0], threads)

    names = [e[0] for e in entries]
    meta = build_metadata(metadata or {}, detect_metadata(root, names))
    if prefetch is None:
        prefetch = default_prefetch(entries)
    manifest = mf.Manifest(model_id, version, result_files, metadata=meta, prefetch=prefetch,
                           store=store.url)
    data = manifest.dumps()
    mf.loads(data)  # what we publish must pass our own loader
    if publish:
        store.sync()
        store.put_manifest_bytes(model_id, version, data)
    return GenerateResult(manifest, len(result_files), manifest.logical_size, total_chunks,
                          len(seen), counters["new_chunks"], counters["new_bytes"], warnings)


def _recheck_touched(store: Store, touched: list[tuple[str, Path, int, int]], last: float,
                     threads: int) -> None:
    """Close the race with a concurrent gc (docs/adr/0005-gc.md): gc deletes a chunk only within
    ``GC_DELETE_WINDOW`` of seeing it old, so once that much time has passed since our last refresh,
    any chunk we deduplicated against is either still there or visibly gone — and then we upload it
    again from the model file."""
    wait = config.GC_DELETE_WINDOW * 1.5 - (time.monotonic() - last)
    if wait > 0:
        time.sleep(wait)

    def check(item: tuple[str, Path, int, int]) -> None:
        cid, full, a, b = item
        if store.has_chunk(cid):
            return
        with open(full, "rb") as f:
            f.seek(a)
            data = f.read(b - a)
        if blake3.blake3(data).hexdigest() != cid:
            raise GenerateError(f"{full} changed while mlfs generate was reading it")
        store.put_chunk(cid, data)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(check, touched))


def _map(fh, size: int) -> mmap.mmap | bytes:
    if size == 0:
        return b""
    m = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
    m.madvise(mmap.MADV_SEQUENTIAL)
    return m


def match_prefetch(patterns: list[str], path: str) -> bool:
    """True if *path* matches a prefetch pattern (fnmatch; ``all`` or ``*`` match everything)."""
    return any(p in ("all", "*") or fnmatch.fnmatchcase(path, p)
               or fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], p) for p in patterns)
