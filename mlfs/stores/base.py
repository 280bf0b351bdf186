"""The store abstraction: a flat key space holding chunks, manifests and aliases.

Layout inside every store::

    chunks/<first 2 hex>/<blake3 hex>     immutable, content-addressed
    manifests/<id>/<version>.json         written last, after every chunk it names
    aliases/<id>/<alias>                  a version name
    index.json                            every version and alias with its metadata (derived:
                                          rebuilt by generate/rm/alias; what HTTP stores list from)

Only this package knows that layout: the rest of mlfs calls the public methods below.

A backend implements six key-level primitives (``_get``, ``_put``, ``_create``, ``_head``,
``_list``, ``_delete``) and says which of its exceptions are temporary (``is_temp_failure``);
everything else — retries with backoff, the chunk/manifest/alias conveniences — is written once here.
Every exception a public method raises is an ``MlfsError`` (a backend's unforeseen exception becomes
a ``StoreError`` naming the operation), so no caller, and no background task of a mount, has to know
a backend's exception types.

Published versions are immutable (docs/adr/0013): ``create_manifest`` publishes only where no
manifest exists, atomically, so of two concurrent publishers of one ``id@version`` exactly one wins.
Aliases are mutable: ``put_alias`` replaces.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from .. import codec, config
from ..errors import CorruptChunk, MlfsError, ObjectNotFound, StoreError, StoreUnavailable

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def manifest_key(model_id: str, version: str) -> str:
    return f"manifests/{model_id}/{version}.json"


INDEX_KEY = "index.json"
#: Largest index document a reader accepts (it is untrusted input over HTTP).
MAX_INDEX = 64 << 20


class Store(ABC):
    """Base class of all stores.  Methods may be called from many threads at once."""

    url: str
    #: False for stores that can only be read (HTTP): generate, rm, alias and gc refuse them.
    writable: bool = True
    #: Counted by the retry loop and the verified GET; read by ``mlfs stats``.
    retries: int = 0
    corrupt_reads: int = 0
    #: Bytes of chunk objects received (frames count as stored, not as decoded).
    received_bytes: int = 0

    # -- primitives -----------------------------------------------------------------------------
    @abstractmethod
    def _get(self, key: str) -> bytes:
        """Whole object; raise ObjectNotFound if missing."""

    @abstractmethod
    def _put(self, key: str, data: bytes | memoryview) -> None:
        """Atomically create or replace an object: readers see all of it or nothing."""

    @abstractmethod
    def _create(self, key: str, data: bytes) -> bool:
        """Create an object only if no object has the key, atomically: True if this call created
        it, False if one was there (then nothing is written)."""

    @abstractmethod
    def _head(self, key: str) -> ObjectInfo | None:
        """Size and mtime, or None if missing."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with *prefix* (paginated as the backend needs)."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove an object; missing is not an error."""

    def _touch(self, key: str) -> None:
        """Set an existing object's mtime to now (gc's age check; see docs/adr/0005-gc.md)."""
        self._put(key, self._get(key))

    def is_temp_failure(self, exc: BaseException) -> bool:
        """True if retrying *exc* may succeed (timeouts, 5xx, throttling, resets)."""
        return isinstance(exc, StoreUnavailable)

    def check(self) -> None:
        """Raise a clear StoreError if the store does not exist or cannot be reached."""

    def check_once(self) -> None:
        """``check()`` unless it already succeeded on this object (a daemon forked after the
        command checked the store does not ask again: one round trip less before readiness)."""
        if not getattr(self, "_checked", False):
            self.check()
            self._checked = True

    def reached(self) -> None:
        """Record that the store answered a request (``check_once`` need not ask it again)."""
        self._checked = True

    def sync(self) -> None:
        """Make every object written so far durable (called before a manifest is published)."""

    def describe(self) -> str:
        return self.url

    # -- retries --------------------------------------------------------------------------------
    def retry(self, fn: Callable[[], T], what: str, deadline: float | None = None) -> T:
        """Call *fn* until it succeeds, fails permanently, or *deadline* seconds have passed.

        Exponential backoff with full jitter (0.05 s doubling to 2 s).  A temporary failure left at
        the deadline becomes StoreUnavailable naming *what*.
        """
        budget = config.RETRY_DEADLINE if deadline is None else deadline
        end = time.monotonic() + budget
        delay = 0.05
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified right below
                if not self.is_temp_failure(e):
                    if isinstance(e, MlfsError):
                        raise
                    # A backend exception nobody mapped (an expired token, a 400...): still one
                    # of ours, so no caller can be surprised by a backend's exception type.
                    raise StoreError(f"{what}: store {self.describe()} refused: {_one_line(e)}") \
                        from None
                left = end - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(
                        f"{what}: store {self.describe()} kept failing for {budget:.0f}s "
                        f"({_one_line(e)})") from None
                self.retries += 1
                time.sleep(min(left, random.uniform(0, delay)))
                delay = min(delay * 2, 2.0)

    def _listing(self, prefix: str) -> Iterator[ObjectInfo]:
        """``_list`` with every exception an MlfsError (backends retry pages themselves)."""
        it = iter(self._list(prefix))
        while True:
            try:
                info = next(it)
            except StopIteration:
                return
            except MlfsError:
                raise
            except Exception as e:  # noqa: BLE001 - see retry()
                raise StoreError(f"list {prefix}: store {self.describe()} failed: "
                                 f"{_one_line(e)}") from None
            yield info

    # -- chunks ---------------------------------------------------------------------------------
    def get_chunk(self, chunk_id: str, deadline: float | None = None) -> bytes:
        """The chunk's bytes, unverified: callers check them against the id."""
        return self.retry(lambda: self._get(chunk_key(chunk_id)), f"chunk {chunk_id[:16]}", deadline)

    def get_chunk_verified(self, chunk_id: str, size: int | None, deadline: float | None = None,
                           attempts: int = config.CORRUPT_ATTEMPTS) -> bytes:
        """The chunk's bytes, checked against its id (and *size*, when the caller knows it from a
        manifest): never returns wrong bytes.  A chunk stored as a frame (mlfs.codec) is decoded.

        A body that fails the check (damaged in transit) is fetched again, *attempts* times in all;
        then the object itself is taken to be corrupt (CorruptChunk).
        """
        for _ in range(attempts):
            body = self.get_chunk(chunk_id, deadline)
            self.received_bytes += len(body)
            data = codec.verified(chunk_id, body, size, config.MAX_CHUNK_SIZE)
            if data is not None:
                return data
            self.corrupt_reads += 1
        raise CorruptChunk(f"chunk {chunk_id[:16]} in {self.describe()} is corrupt "
                           f"({len(body)} bytes for a chunk of {size}: neither the chunk nor a "
                           "valid frame of it)")

    def put_chunk_encoded(self, chunk_id: str, data: bytes | memoryview, compress: bool) -> int:
        """Store a chunk, as a frame where *compress* and it pays (mlfs.codec); return the bytes
        stored."""
        frame = codec.encode(data) if compress else None
        body = data if frame is None else frame
        self.put_chunk(chunk_id, body)
        return len(body)

    def has_chunk(self, chunk_id: str) -> bool:
        return self.head_chunk(chunk_id) is not None

    def head_chunk(self, chunk_id: str) -> ObjectInfo | None:
        return self.retry(lambda: self._head(chunk_key(chunk_id)), "head chunk")

    def put_chunk(self, chunk_id: str, data: bytes | memoryview) -> None:
        self.retry(lambda: self._put(chunk_key(chunk_id), data), f"upload chunk {chunk_id[:16]}")

    def touch_chunk(self, chunk_id: str) -> None:
        self.retry(lambda: self._touch(chunk_key(chunk_id)), f"refresh chunk {chunk_id[:16]}")

    def list_chunks(self) -> Iterator[tuple[str, ObjectInfo]]:
        for info in self._listing("chunks/"):
            name = info.key.rsplit("/", 1)[-1]
            if len(name) == 64:
                yield name, info

    def delete_chunk(self, chunk_id: str) -> None:
        self.retry(lambda: self._delete(chunk_key(chunk_id)), "delete chunk")

    # -- manifests ------------------------------------------------------------------------------
    def get_manifest_bytes(self, model_id: str, version: str) -> bytes:
        try:
            return self.retry(lambda: self._get(manifest_key(model_id, version)), "manifest")
        except ObjectNotFound:
            raise ObjectNotFound(
                f"no manifest {model_id}@{version} in store {self.describe()}") from None

    def load_manifest(self, model_id: str, version: str, attempts: int = 3):
        """The manifest ``model_id@version``, validated, checked against its digest and against
        the name it was asked for.  A body that fails (damaged in transit: a flipped byte breaks
        the JSON or the digest) is fetched again, up to *attempts* times, like a chunk."""
        from .. import manifest as mf
        from ..errors import ManifestError

        for attempt in range(attempts):
            data = self.get_manifest_bytes(model_id, version)
            try:
                m = mf.loads(data)
            except ManifestError as e:
                error = e
                self.corrupt_reads += 1
                continue
            if (m.id, m.version) != (model_id, version):
                raise ManifestError(f"{model_id}@{version} in {self.describe()} describes {m.ref}")
            return m
        raise ManifestError(f"{model_id}@{version} in {self.describe()}: {error}")

    def find_manifest_bytes(self, model_id: str, version: str) -> bytes | None:
        """The manifest's bytes, or None if the version is not published."""
        try:
            return self.get_manifest_bytes(model_id, version)
        except ObjectNotFound:
            return None

    def has_manifest(self, model_id: str, version: str) -> bool:
        return self.retry(lambda: self._head(manifest_key(model_id, version)), "head manifest") \
            is not None

    def put_manifest_bytes(self, model_id: str, version: str, data: bytes) -> None:
        """Publish, replacing any manifest of that version (``generate --force``)."""
        self.retry(lambda: self._put(manifest_key(model_id, version), data), "publish manifest")

    def create_manifest(self, model_id: str, version: str, data: bytes) -> bool:
        """Publish only if the version does not exist: True if this call published it.

        A retried create whose first attempt did land returns False; callers compare the manifest
        they find with their own (``generate`` does), so that case reads as "already published,
        same content".
        """
        return self.retry(lambda: self._create(manifest_key(model_id, version), data),
                          "publish manifest")

    def list_manifests(self) -> Iterator[tuple[str, str, ObjectInfo]]:
        for info in self._listing("manifests/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                yield parts[1], parts[2][:-5], info

    def delete_manifest(self, model_id: str, version: str) -> None:
        self.retry(lambda: self._delete(manifest_key(model_id, version)), "delete manifest")

    # -- the index document ----------------------------------------------------------------------
    def get_index_bytes(self) -> bytes | None:
        """The index document's bytes, or None if the store has none."""
        try:
            return self.retry(lambda: self._get(INDEX_KEY), "index")
        except ObjectNotFound:
            return None

    def put_index_bytes(self, data: bytes) -> None:
        self.retry(lambda: self._put(INDEX_KEY, data), "write index")

    # -- aliases --------------------------------------------------------------------------------
    def get_alias(self, model_id: str, alias: str) -> str | None:
        try:
            return self.retry(lambda: self._get(f"aliases/{model_id}/{alias}"), "alias").decode().strip()
        except ObjectNotFound:
            return None

    def put_alias(self, model_id: str, alias: str, version: str) -> None:
        self.retry(lambda: self._put(f"aliases/{model_id}/{alias}", version.encode()), "set alias")

    def delete_alias(self, model_id: str, alias: str) -> None:
        self.retry(lambda: self._delete(f"aliases/{model_id}/{alias}"), "delete alias")

    def aliases(self) -> Iterator[tuple[str, str, str]]:
        """``(model id, alias, version)`` of every alias (one LIST, then one GET per alias)."""
        for info in self._listing("aliases/"):
            parts = info.key.split("/")
            if len(parts) == 3:
                version = self.get_alias(parts[1], parts[2])
                if version:
                    yield parts[1], parts[2], version


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


__all__ = ["Store", "ObjectInfo", "StoreError", "chunk_key", "manifest_key"]
