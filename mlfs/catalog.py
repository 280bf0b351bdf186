"""The store as a catalog: list and search versions, remove them, collect garbage, verify.

Chunks are shared between versions and models, so every operation here starts from the set of all
manifests.  ``gc`` is the only code that deletes chunks; docs/adr/0005-gc.md argues why it can run
while ``generate`` runs elsewhere without losing a live chunk.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import codec, config
from . import manifest as mf
from .errors import ManifestError, MlfsError, ObjectNotFound, UsageError
from .stores import Store

log = logging.getLogger("mlfs.catalog")



@dataclass
class Version:
    manifest: mf.Manifest
    aliases: list[str] = field(default_factory=list)
    unique_bytes: int = 0  # bytes referenced by no other version: what removing it frees

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {"id": m.id, "version": m.version, "created": m.created, "digest": m.digest,
                "metadata": m.metadata, "logical_bytes": m.logical_size,
                "unique_bytes": self.unique_bytes, "aliases": self.aliases,
                "files": len(m.files)}


def load_all(store: Store, model_id: str | None = None, threads: int = 16) -> list[mf.Manifest]:
    """Every manifest of the store (or of one model).  An unreadable manifest is an error: callers
    such as gc must never act on a partial view."""
    keys = [(i, v) for i, v, _ in store.list_manifests() if model_id is None or i == model_id]

    def load(key: tuple[str, str]) -> mf.Manifest:
        i, v = key
        try:
            return store.load_manifest(i, v)
        except ManifestError as e:
            raise ManifestError(f"manifest {i}@{v} in {store.describe()} is invalid: {e}") from None
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(load, keys))


def list_aliases(store: Store) -> dict[tuple[str, str], list[str]]:
    """(id, version) → alias names."""
    out: dict[tuple[str, str], list[str]] = {}
    for model_id, name, version in store.aliases():
        out.setdefault((model_id, version), []).append(name)
    return out


def parse_filter(text: str) -> tuple[str, str, str]:
    """``KEY=VALUE`` (exact; ``tag=X`` is tag membership) or ``KEY~VALUE`` (substring)."""
    for op in ("~", "="):
        key, sep, value = text.partition(op)
        if sep and key and "=" not in key:
            return key.strip(), op, value
    raise UsageError(f"invalid filter {text!r}: use KEY=VALUE, tag=VALUE or KEY~SUBSTRING")


def matches(m: mf.Manifest, filters: Iterable[tuple[str, str, str]]) -> bool:
    meta = m.metadata
    for key, op, value in filters:
        if key in ("tag", "tags"):
            tags = [t.lower() for t in meta.get("tags", [])]
            ok = value.lower() in tags if op == "=" else any(value.lower() in t for t in tags)
        else:
            if key in ("id", "version", "created"):
                actual = getattr(m, key)
            elif key in meta and key != "extra":
                actual = meta[key]
            else:
                actual = (meta.get("extra") or {}).get(key)
            actual = "" if actual is None else str(actual)
            ok = actual == value if op == "=" else value.lower() in actual.lower()
        if not ok:
            return False
    return True


def versions(store: Store, model_id: str | None = None,
             filters: Iterable[tuple[str, str, str]] = ()) -> tuple[list[Version], dict[str, Any]]:
    """Versions (filtered) with their unique bytes, and store-wide totals."""
    store.check()
    everything = load_all(store)
    refs: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    for m in everything:
        cs = m.chunk_sizes()
        refs.update(cs.keys())
        sizes.update(cs)
    aliases = list_aliases(store)
    filters = list(filters)
    out = []
    for m in sorted(everything, key=lambda m: (m.id, m.created, m.version)):
        if model_id is not None and m.id != model_id or not matches(m, filters):
            continue
        unique = sum(s for c, s in m.chunk_sizes().items() if refs[c] == 1)
        out.append(Version(m, sorted(aliases.get((m.id, m.version), [])), unique))
    stored = count = unreferenced = None
    if store.writable:  # an HTTP store cannot list its chunks
        stored = count = unreferenced = 0
        for cid, info in store.list_chunks():
            stored += info.size  # as stored: frames (mlfs.codec) take less than their chunks
            count += 1
            if cid not in sizes:
                unreferenced += info.size
    logical = sum(m.logical_size for m in everything)
    referenced = sum(sizes.values())
    totals = {"models": len({m.id for m in everything}), "versions": len(everything),
              "logical_bytes": logical, "referenced_bytes": referenced, "stored_bytes": stored,
              "chunks": count,
              "unreferenced_bytes": unreferenced,
              "dedup_ratio": round(logical / referenced, 3) if referenced else None}
    return out, totals


def require_writable(store: Store, what: str) -> None:
    if not store.writable:
        raise UsageError(f"{what} needs a writable store; {store.describe()} is read-only "
                         "(run it against the directory or bucket behind it)")


def remove(store: Store, model_id: str, version: str) -> list[str]:
    """Remove a version's manifest and the aliases pointing at it (returned).  Chunks stay for gc."""
    require_writable(store, "rm")
    store.check()
    mf.check_name("model id", model_id)
    mf.check_name("version", version)
    if not store.has_manifest(model_id, version):
        raise ObjectNotFound(f"no manifest {model_id}@{version} in {store.describe()}")
    removed = [a for a in list_aliases(store).get((model_id, version), [])]
    for alias in removed:
        store.delete_alias(model_id, alias)
    store.delete_manifest(model_id, version)
    rebuild_index(store)
    return removed


@dataclass
class GcResult:
    deleted: int = 0
    deleted_bytes: int = 0
    kept_recent: int = 0  # unreferenced but younger than the grace period
    kept_bytes: int = 0
    referenced: int = 0
    dry_run: bool = False
    candidates: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["candidates"] = len(self.candidates)
        return d


def gc(store: Store, grace: float = 3600.0, dry_run: bool = False) -> GcResult:
    """Delete chunks no manifest references that are older than *grace* seconds.

    Order matters (docs/adr/0005-gc.md): chunks are listed *before* the manifests are read, so a
    chunk listed here whose manifest is published later was uploaded or refreshed by its generate
    less than *grace* ago; and each candidate's age is checked again just before it is deleted.
    """
    require_writable(store, "gc")
    store.check()
    listed = list(store.list_chunks())
    referenced: set[str] = set()
    for m in load_all(store):
        referenced.update(m.chunk_sizes())
    res = GcResult(dry_run=dry_run, referenced=len(referenced))
    now = time.time()
    for cid, info in listed:
        if cid in referenced:
            continue
        if now - info.mtime < grace:
            res.kept_recent += 1
            res.kept_bytes += info.size
            continue
        res.candidates.append(cid)
        if dry_run:
            res.deleted += 1
            res.deleted_bytes += info.size
            continue
        fresh = store.head_chunk(cid)
        checked = time.monotonic()
        if fresh is None:
            continue
        if time.time() - fresh.mtime < grace:  # refreshed by a generate since we listed it
            res.kept_recent += 1
            res.kept_bytes += fresh.size
            continue
        if time.monotonic() - checked > config.GC_DELETE_WINDOW:
            continue  # too slow to trust the check; the next gc will see it again
        store.delete_chunk(cid)
        res.deleted += 1
        res.deleted_bytes += fresh.size
    return res


@dataclass
class Damage:
    model: str
    version: str
    path: str
    chunk: str
    problem: str
    tensors: list[str]

    def __str__(self) -> str:
        t = f" (tensors: {', '.join(self.tensors[:5])}{' ...' if len(self.tensors) > 5 else ''})" \
            if self.tensors else ""
        return f"{self.model}@{self.version}: {self.path}: chunk {self.chunk[:16]} {self.problem}{t}"


def verify(store: Store, deep: bool = False, threads: int = 8) -> tuple[list[Damage], dict[str, int]]:
    """Check every chunk every manifest references: present with the right size; ``deep`` also
    re-hashes each one (every distinct chunk is read once)."""
    store.check()
    manifests = load_all(store)
    present = {cid: info.size for cid, info in store.list_chunks()}
    needed: dict[str, int] = {}
    for m in manifests:
        needed.update(m.chunk_sizes())
    problems: dict[str, str] = {}
    for cid, size in needed.items():
        if cid not in present:
            problems[cid] = "is missing"
        elif present[cid] > size or present[cid] < min(size, codec.HEADER + 4):
            # Shorter is a frame (mlfs.codec), checked by --deep; longer is always wrong.
            problems[cid] = f"has {present[cid]} bytes, expected {size}"
    if deep:
        def check(cid: str) -> tuple[str, str | None]:
            try:
                body = store.get_chunk(cid)
            except ObjectNotFound:
                return cid, "is missing"
            if codec.verified(cid, body, needed[cid], config.MAX_CHUNK_SIZE) is None:
                return cid, "is corrupt (blake3 mismatch)"
            return cid, None
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for cid, problem in pool.map(check, [c for c in needed if c not in problems]):
                if problem:
                    problems[cid] = problem
    damage = []
    for m in sorted(manifests, key=lambda m: (m.id, m.version)):
        for f in m.files:
            for cid, off, size in zip(f.chunk_ids, f.offsets, f.chunk_sizes):
                if cid in problems:
                    tensors = sorted(n for n, (b, e, _) in (f.tensors or {}).items()
                                     if b < off + size and e > off)
                    damage.append(Damage(m.id, m.version, f.path, cid, problems[cid], tensors))
    return damage, {"manifests": len(manifests), "chunks_checked": len(needed),
                    "damaged_chunks": len(problems), "deep": deep}


def parse_duration(text: str) -> float:
    """``"1h"``, ``"30m"``, ``"90s"``, ``"2d"``, ``"0"`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise UsageError(f"invalid duration {text!r} (examples: 1h, 30m, 90s)") from None


def rebuild_index(store: Store, attempts: int = 3) -> bool:
    """Rewrite the store's index document from its listing (docs/adr/0016); False if the store
    cannot be written (an HTTP store: its index is the origin's).

    Manifests are read again only when new or changed (by their listed mtime).  After writing, the
    listing is taken again: a version another process published meanwhile makes us rebuild, so two
    writers racing end with an index that holds both (at most *attempts* rounds).
    """
    if not store.writable:
        return False
    from . import index as ix

    old = None
    raw = store.get_index_bytes()
    if raw is not None:
        try:
            old = ix.loads(raw)
        except ManifestError:
            old = None
    def by_ref(idx) -> dict:
        return {(v["id"], v["version"]): v for v in idx.versions} if idx else {}
    known = by_ref(old)
    for _ in range(attempts):
        new = _index_from_listing(store, known)
        store.put_index_bytes(new.dumps())
        again = _index_from_listing(store, by_ref(new))
        if again.same_as(new):
            return True
        known = by_ref(again)
    log.warning("index of %s still changing after %d rebuilds; the next change rebuilds it again",
                store.describe(), attempts)
    return True


def _index_from_listing(store: Store, known: dict) -> "Any":
    from . import index as ix

    out = ix.Index()
    for mid, version, info in store.list_manifests():
        entry = known.get((mid, version))
        if entry is None or entry.get("mtime") != info.mtime:
            try:
                m = store.load_manifest(mid, version)
            except (ManifestError, ObjectNotFound) as e:
                log.warning("index: skipping %s@%s: %s", mid, version, e)
                continue
            entry = {"id": m.id, "version": m.version, "created": m.created, "digest": m.digest,
                     "metadata": m.metadata, "logical_bytes": m.logical_size,
                     "files": len(m.files), "mtime": info.mtime}
        out.versions.append(entry)
    out.aliases = [{"id": mid, "alias": name, "version": version}
                   for mid, name, version in store.aliases()]
    return out


def set_alias(store: Store, model_id: str, name: str, version: str) -> None:
    """Point ``model_id/name`` at an existing version, and update the index."""
    require_writable(store, "alias set")
    store.check()
    mf.check_name("model id", model_id)
    mf.check_name("alias", name)
    mf.check_name("version", version)
    store.get_manifest_bytes(model_id, version)  # must exist
    store.put_alias(model_id, name, version)
    rebuild_index(store)


__all__ = ["versions", "remove", "gc", "verify", "rebuild_index", "set_alias", "Damage",
           "GcResult", "MlfsError"]
