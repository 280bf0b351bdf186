"""Naming a manifest: a local file path, or ``ID@VERSION`` in a store."""

from __future__ import annotations

import os

from . import manifest as mf
from .errors import ManifestError, ObjectNotFound, UsageError
from .stores import Store, open_store


def read_manifest_file(path: str) -> mf.Manifest:
    try:
        with open(path, "rb") as f:
            data = f.read(512 << 20)
    except IsADirectoryError:
        raise ManifestError(f"cannot read manifest {path}: is a directory") from None
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror}") from None
    try:
        return mf.loads(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def resolve(source: str | None, store_url: str | None = None, *, model_id: str | None = None,
            version: str | None = None, endpoint_url: str | None = None
            ) -> tuple[mf.Manifest, Store | None]:
    """Load a manifest and open the store its chunks come from.

    *source* is a manifest file, or ``ID@VERSION`` (with *store_url*), or None with *model_id* and
    *version*.  The store is *store_url* if given, else the manifest's own ``store`` hint (chunks are
    verified against their ids, so a hint can at worst fail to serve, never serve wrong bytes).
    """
    if source and os.path.exists(source):
        m = read_manifest_file(source)
        url = store_url or m.store
        return m, (open_store(url, endpoint_url=endpoint_url) if url else None)
    if source:
        if "@" not in source:
            raise UsageError(f"manifest {source!r} not found (give a file or ID@VERSION with --store)")
        model_id, version = mf.parse_ref(source)
    if not (model_id and version):
        raise UsageError("name a manifest: a file, ID@VERSION, or --id and --version")
    if not store_url:
        raise UsageError(f"{model_id}@{version} needs --store (or MLFS_STORE)")
    store = open_store(store_url, endpoint_url=endpoint_url)
    try:
        m = store.load_manifest(model_id, version)
    except ObjectNotFound:
        store.check_once()  # a store that is not there says so, rather than "no manifest"
        raise
    store.reached()  # the manifest came from it: no separate check before mounting
    return m, store
