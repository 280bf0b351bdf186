"""``generate``: a model directory → chunks in a store → a manifest, published last.

Each file is read once (mmap); chunk hashing, per-tensor hashing and uploads run in a thread pool
(blake3 and file/socket I/O release the GIL) while another thread streams the whole-file hash over the
same pages.  A chunk already in the store, or already handled in this run, is not uploaded again.
Only when every chunk is stored and ``store.sync()`` made them durable is the manifest written, so a
crash at any point never leaves a manifest naming a missing chunk.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import blake3

from . import config
from . import formats
from . import manifest as mf
from .chunking import HeaderError, generic_spans, header_length, parse_safetensors_header, \
    safetensors_spans
from .errors import GenerateError, MlfsError, ObjectNotFound, UsageError, VersionExists
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
    #: What the new chunks take in the store (less than new_bytes where frames pay: mlfs.codec).
    stored_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    outcome: str = "published"  # "published", "unchanged", "replaced" or "not published"

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

    def fail(e: OSError) -> None:  # os.walk would skip an unreadable directory silently
        where = os.path.relpath(e.filename, model_dir) if e.filename else "."
        raise GenerateError(f"cannot read directory {where}: {e.strerror}")

    out = []
    for dirpath, dirnames, filenames in os.walk(model_dir, followlinks=True, onerror=fail):
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
    """Chunk spans (and tensors, for files whose structure we read) of one file, with a warning
    if its structure could not be trusted and it is stored as plain fixed pieces."""
    if rel.endswith(".safetensors"):
        try:
            n = header_length(data[:8], size)
            data_start, tensors = parse_safetensors_header(data[:8 + n], size)
        except HeaderError as e:
            return generic_spans(size), None, f"{rel}: not a valid safetensors file ({e}); stored as plain bytes"
        return (safetensors_spans(data_start, tensors, size),
                [(t.name, t.begin, t.end) for t in tensors], None)
    try:
        found = formats.layout(rel, data, size)
    except HeaderError as e:
        return generic_spans(size), None, f"{rel}: its header cannot be trusted ({e}); stored as plain bytes"
    if found is None:
        return generic_spans(size), None, None
    if not covers(found.spans, size) or len({n for n, _, _ in found.tensors}) != len(found.tensors):
        return generic_spans(size), None, f"{rel}: {found.kind} layout is inconsistent; stored as plain bytes"
    return found.spans, found.tensors, None


def covers(spans: list[tuple[int, int]], size: int) -> bool:
    """True if *spans* cut ``[0, size)`` into non-empty pieces in order, no gap, no overlap,
    none larger than a manifest may reference."""
    pos = 0
    for a, b in spans:
        if a != pos or b <= a or b - a > config.MAX_CHUNK_SIZE:
            return False
        pos = b
    return pos == size


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
    elif any(n.endswith(".gguf") for n in names):
        found["framework"] = "gguf"
    elif any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        found["framework"] = "pytorch"
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


class ChunkUploader:
    """Stores each distinct chunk of a run once, from any number of threads.

    A chunk the store lacks is uploaded.  A chunk it has is *refreshed* (its mtime renewed) so a
    concurrent gc does not collect it before our manifest is published, and remembered for
    :func:`recheck_refreshed`.  A chunk gc deletes between our existence check and the refresh is
    simply uploaded (docs/adr/0005-gc.md).
    """

    def __init__(self, store: Store, compress: bool = True) -> None:
        self.store = store
        self.compress = compress
        self._seen: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.new_chunks = 0
        self.new_bytes = 0
        self.stored_bytes = 0
        #: ``(chunk id, file, begin, end)`` of chunks that existed; and when the last was refreshed.
        self.refreshed: list[tuple[str, Path, int, int]] = []
        self.last_refresh = 0.0

    @property
    def unique_chunks(self) -> int:
        return len(self._seen)

    def put(self, view: memoryview, full: Path, begin: int) -> str:
        """Hash *view* (bytes ``begin:`` of file *full*) and make sure the store holds it; return
        its id.  Concurrent calls for one chunk do the work once and all wait for it."""
        cid = blake3.blake3(view).hexdigest()
        with self._lock:
            fut = self._seen.get(cid)
            owner = fut is None
            if owner:
                fut = self._seen[cid] = Future()
        if not owner:
            fut.result()
            return cid
        try:
            self._store(cid, view, full, begin)
        except BaseException as e:
            fut.set_exception(e)
            raise
        fut.set_result(None)
        return cid

    def _store(self, cid: str, view: memoryview, full: Path, begin: int) -> None:
        if self.store.has_chunk(cid):
            try:
                self.store.touch_chunk(cid)
            except ObjectNotFound:
                pass  # gc took it between the HEAD and the refresh: upload it below
            else:
                with self._lock:
                    self.refreshed.append((cid, full, begin, begin + len(view)))
                    self.last_refresh = time.monotonic()
                return
        stored = self.store.put_chunk_encoded(cid, view, self.compress)
        with self._lock:
            self.new_chunks += 1
            self.new_bytes += len(view)
            self.stored_bytes += stored


def recheck_refreshed(store: Store, refreshed: list[tuple[str, Path, int, int]], last: float,
                      threads: int = config.DEFAULT_THREADS,
                      sleep: Callable[[float], None] = time.sleep, compress: bool = True) -> int:
    """Close the race with a concurrent gc (docs/adr/0005-gc.md): gc deletes a chunk only within
    ``GC_DELETE_WINDOW`` of seeing it old, so once that much time has passed since our last refresh,
    any chunk we deduplicated against is either still there or visibly gone — and then we upload it
    again from the model file.  Returns the number of chunks uploaded again."""
    if not refreshed:
        return 0
    wait = config.GC_DELETE_WINDOW * 1.5 - (time.monotonic() - last)
    if wait > 0:
        sleep(wait)

    def check(item: tuple[str, Path, int, int]) -> int:
        cid, full, a, b = item
        if store.has_chunk(cid):
            return 0
        try:
            with open(full, "rb") as f:
                f.seek(a)
                data = f.read(b - a)
        except OSError as e:
            raise GenerateError(f"cannot read {full}: {e.strerror}") from None
        if blake3.blake3(data).hexdigest() != cid:
            raise GenerateError(f"{full} changed while mlfs generate was reading it")
        store.put_chunk_encoded(cid, data, compress)
        return 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(check, refreshed))


def chunk_file(pool: ThreadPoolExecutor, uploader: ChunkUploader, rel: str, full: Path, size: int,
               mode: int, slots: threading.BoundedSemaphore,
               progress: Callable[[int], None] | None = None) -> tuple[mf.FileEntry, str | None]:
    """Cut one file, store its chunks, hash it and its tensors; return its entry and a warning.

    The file is mapped once; every task works on a view of the mapping, and the mapping is closed
    only when every task is over, whatever failed (closing it under live views would raise
    BufferError and hide the real error).
    """
    try:
        fh = open(full, "rb")
    except OSError as e:
        raise GenerateError(f"cannot read {rel}: {e.strerror}") from None
    with fh:
        try:
            data = _map(fh, size)
        except OSError as e:
            raise GenerateError(f"cannot read {rel}: {e.strerror}") from None
        futures: list[Future] = []
        try:
            spans, tensors, warning = plan_spans(rel, data, size)
            whole = pool.submit(_file_hash, data)
            futures.append(whole)
            chunk_futs = []
            for a, b in spans:
                slots.acquire()
                chunk_futs.append(pool.submit(_chunk_task, uploader, slots, data, a, b, full,
                                              progress))
            futures += chunk_futs
            tfuts = [(name, a, b, pool.submit(_tensor_hash, data, a, b))
                     for name, a, b in tensors or []]
            futures += [f for *_, f in tfuts]
            ids = [f.result() for f in chunk_futs]
            tinfo = {name: (a, b, f.result()) for name, a, b, f in tfuts}
            digest = whole.result()
        except MlfsError:
            raise  # a StoreError is an OSError too: it must keep its own message
        except OSError as e:  # an I/O error surfacing while the mapped pages are read
            raise GenerateError(f"cannot read {rel}: {e.strerror or e}") from None
        finally:
            for f in futures:
                f.cancel()
            wait(futures)
            if isinstance(data, mmap.mmap):
                data.close()
    entry = mf.FileEntry(rel, size, mode, digest, ids, [b - a for a, b in spans],
                         tinfo if tensors is not None else None)
    return entry, warning


def _chunk_task(uploader: ChunkUploader, slots: threading.BoundedSemaphore, data, a: int, b: int,
                full: Path, progress: Callable[[int], None] | None) -> str:
    try:
        with memoryview(data) as whole, whole[a:b] as view:
            cid = uploader.put(view, full, a)
        if progress:
            progress(b - a)
        return cid
    finally:
        slots.release()


def _tensor_hash(data, a: int, b: int) -> str:
    with memoryview(data) as whole, whole[a:b] as view:
        return blake3.blake3(view).hexdigest()[:16]


def _file_hash(data) -> str:
    h = blake3.blake3()
    step = 16 << 20
    with memoryview(data) as whole:
        for off in range(0, len(whole), step):
            with whole[off:off + step] as view:
                h.update(view)
    return h.hexdigest()


def publish(store: Store, manifest: mf.Manifest, *, force: bool = False) -> tuple[mf.Manifest, str]:
    """Publish *manifest*; return the manifest now published and what happened:
    ``"published"``, ``"unchanged"`` (the same content was already published: a no-op) or
    ``"replaced"`` (``force``).  Published versions are immutable (docs/adr/0013): other content
    under an existing ``id@version`` raises VersionExists unless *force*."""
    data = manifest.dumps()
    mf.loads(data)  # what we publish must pass our own loader
    mid, version = manifest.id, manifest.version
    if force:
        existed = store.has_manifest(mid, version)
        store.put_manifest_bytes(mid, version, data)
        return manifest, "replaced" if existed else "published"
    for _ in range(3):
        if store.create_manifest(mid, version, data):
            return manifest, "published"
        existing = store.find_manifest_bytes(mid, version)
        if existing is None:
            continue  # removed between our create and our read: try again
        if existing == data:  # identical bytes: another run in the same second, or our own
            return manifest, "unchanged"  # create that landed before a retried attempt
        try:
            old = mf.loads(existing)
        except mf.ManifestError as e:
            raise VersionExists(f"{manifest.ref} is already published in {store.describe()} but "
                                f"its manifest is unreadable ({e}); --force replaces it") from None
        if mf.same_content(old, manifest):
            return old, "unchanged"
        raise VersionExists(
            f"{manifest.ref} is already published in {store.describe()} with other content "
            f"({old.digest[:23]}..., created {old.created}); published versions are immutable: "
            f"publish a new version, or pass --force to replace it")
    raise VersionExists(f"{manifest.ref} keeps appearing and disappearing in {store.describe()}; "
                        "not published")


def generate(model_dir: str | os.PathLike[str], store: Store, model_id: str, version: str, *,
             prefetch: list[str] | None = None, metadata: dict[str, str] | None = None,
             progress: Callable[[int], None] | None = None, threads: int = config.DEFAULT_THREADS,
             publish_manifest: bool = True, force: bool = False,
             compress: bool = True) -> GenerateResult:
    """Store every file of *model_dir* as chunks and publish the manifest ``model_id@version``.

    ``progress`` is called with the number of bytes processed after each chunk.
    With *compress*, a chunk that a frame makes at least ``codec.MIN_SAVING`` smaller is stored as
    one (mlfs.codec; its id is still the blake3 of its bytes).
    Raises GenerateError for an unreadable or empty model, VersionExists if the version is
    published with other content (unless *force*), StoreError for store failures; in every case
    no manifest is published.
    """
    mf.check_name("model id", model_id)
    mf.check_name("version", version)
    if not isinstance(threads, int) or not 1 <= threads <= config.MAX_THREADS:
        raise UsageError(f"invalid thread count {threads!r}: use 1 to {config.MAX_THREADS}")
    root = Path(model_dir)
    entries = scan_model_dir(root)
    if not entries:
        raise GenerateError(f"model directory {root} holds no files: nothing to publish")
    if not store.writable:
        raise UsageError(f"{store.describe()} is read-only: generate into a directory or S3 store")
    store.check()

    uploader = ChunkUploader(store, compress)
    # Bound the work queued ahead of the threads (each task holds a view of a mapping).
    slots = threading.BoundedSemaphore(threads * 8)
    files: list[mf.FileEntry] = []
    warnings: list[str] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlfs-gen") as pool:
        for rel, full, size, mode in entries:
            entry, warning = chunk_file(pool, uploader, rel, full, size, mode, slots, progress)
            files.append(entry)
            if warning:
                warnings.append(warning)

    names = [e[0] for e in entries]
    meta = build_metadata(metadata or {}, detect_metadata(root, names))
    if prefetch is None:
        prefetch = default_prefetch(entries)
    manifest = mf.Manifest(model_id, version, files, metadata=meta, prefetch=prefetch,
                           store=store.url)
    outcome = "not published"
    if publish_manifest:
        recheck_refreshed(store, uploader.refreshed, uploader.last_refresh, threads,
                          compress=compress)
        store.sync()  # every chunk durable before a manifest names it
        manifest, outcome = publish(store, manifest, force=force)
        from .catalog import rebuild_index

        rebuild_index(store)
    else:
        mf.loads(manifest.dumps())
    return GenerateResult(manifest, len(files), manifest.logical_size,
                          sum(len(f.chunk_ids) for f in files), uploader.unique_chunks,
                          uploader.new_chunks, uploader.new_bytes, uploader.stored_bytes, warnings,
                          outcome)


def _map(fh, size: int) -> mmap.mmap | bytes:
    if size == 0:
        return b""
    m = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
    m.madvise(mmap.MADV_SEQUENTIAL)
    return m
