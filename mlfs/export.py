"""Rebuild a manifest's files byte-exact without FUSE (verification; platforms without FUSE).

Files are built in a staging directory beside the destination (same file system, so moving them in
is a rename), each chunk and each whole file verified; only when every file is complete do they
move into place.  A failure at any point removes the staging directory and leaves the destination
as it was.  A non-empty destination is refused unless ``force``; then existing files of the same
name are replaced (each by one rename) and other files are left alone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import blake3

from . import config
from .errors import CorruptChunk, MlfsError, UsageError
from .manifest import Manifest
from .stores import Store


def export(manifest: Manifest, store: Store, dest: str | os.PathLike[str], *,
           threads: int = config.DEFAULT_THREADS, force: bool = False,
           progress: Callable[[int], None] | None = None) -> int:
    """Write every file of *manifest* under *dest*; return the bytes written."""
    root = Path(dest).absolute()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise UsageError(f"{dest} is not empty; pass --force to write into it")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = root.parent / f".{root.name}.mlfs-export-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise MlfsError(f"cannot write beside {dest}: {e.strerror}") from None
    try:
        total = _build(manifest, store, staging, threads, progress)
        _move_in(staging, root, manifest)
    except OSError as e:
        raise MlfsError(f"cannot export to {dest}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def _build(manifest: Manifest, store: Store, staging: Path, threads: int,
           progress: Callable[[int], None] | None) -> int:
    total = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlfs-export") as pool:
        for f in manifest.files:
            target = staging / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            h = blake3.blake3()
            with open(target, "wb") as out:
                window = 32
                ids = list(zip(f.chunk_ids, f.chunk_sizes))
                for start in range(0, len(ids), window):
                    for data in pool.map(lambda r: store.get_chunk_verified(*r),
                                         ids[start:start + window]):
                        out.write(data)
                        h.update(data)
                        if progress:
                            progress(len(data))
            if h.hexdigest() != f.blake3:
                raise CorruptChunk(f"{f.path}: rebuilt file does not match its blake3")
            os.chmod(target, f.mode)
            total += f.size
    return total


def _move_in(staging: Path, root: Path, manifest: Manifest) -> None:
    if not root.exists():
        os.rename(staging, root)
        staging.mkdir()  # the caller removes it
        return
    if not any(root.iterdir()):
        root.rmdir()
        os.rename(staging, root)
        staging.mkdir()
        return
    for f in manifest.files:  # --force into a non-empty directory: one rename per file
        target = root / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f.path, target)


__all__ = ["export", "MlfsError"]
