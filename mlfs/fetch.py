"""Where a mount's chunk bytes come from: memory → disk cache → store (trio side).

- A bounded in-memory LRU of recently used chunks answers most FUSE reads without a thread hop
  (the kernel reads a 4 MiB chunk in 128 KiB–1 MiB requests).
- Single flight: however many readers want a chunk, it is loaded or fetched once; the others wait
  for the same result.
- Blocking work (cache file reads, store GETs, blake3) runs in threads under limiters: ``fetch_limit``
  concurrent store requests for readers; background warming (``--prefetch all``) takes at most
  ``background_limit`` of them, so reads jump its queue.
- A global byte budget bounds the data in flight (fetched but not yet in the LRU), whatever the number
  of open files: memory is ``memory_bytes + inflight_bytes`` at most, plus Python's overhead.
- Every chunk from the store is verified against its id before it is served or cached; the disk
  cache verifies on load.  A chunk that cannot be had raises StoreError after the store's retry
  deadline; the caller turns it into EIO.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass

import trio

from . import config
from .cache import SMALL_CHUNK, ChunkCache
from .errors import MlfsError, StoreError
from .stores import Store

log = logging.getLogger("mlfs.fetch")

#: Disk cache loads at once.  Background loads take at most all but one of them (docs/adr/0023).
DISK_THREADS = 4
#: Block reads (docs/adr/0026) of at most this many bytes are done on the event loop itself
#: while the disk cache has nothing else to do: a hand-off to a worker thread and back cost more
#: than the read (docs/adr/0028).  ``MLFS_INLINE_PART_READS=0`` sends them all to threads.
INLINE_PART_MAX = 64 << 10
INLINE_PART_READS = os.environ.get("MLFS_INLINE_PART_READS") != "0"
#: An inline block read slower than this (a disk in trouble) sends block reads to worker threads
#: for ``INLINE_BACKOFF`` seconds: the event loop answers every other request meanwhile.
INLINE_SLOW, INLINE_BACKOFF = 0.005, 30.0


@dataclass
class Counters:
    bytes_served: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    memory_hits: int = 0  # chunk reads answered from the in-memory LRU
    disk_hits: int = 0  # chunk loads answered by the disk cache
    cache_misses: int = 0  # chunk loads that had to go to the store
    fetch_errors: int = 0
    uncached_chunks: int = 0  # fetched but not admitted to the disk cache (full, unwritable)
    prefetched_bytes: int = 0
    streamed_bytes: int = 0  # brought in by recognised loads (mlfs.prefetch)


class ByteBudget:
    """A counting semaphore measured in bytes (a request larger than the budget waits for all)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = trio.Condition()

    async def acquire(self, n: int) -> None:
        n = min(n, self.limit)
        async with self._cond:
            while self.used + n > self.limit:
                await self._cond.wait()
            self.used += n

    async def release(self, n: int) -> None:
        n = min(n, self.limit)
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Flight:
    __slots__ = ("event", "data", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkSource:
    def __init__(self, store: Store | None, cache: ChunkCache, *,
                 memory_bytes: int = config.parse_size(config.DEFAULT_MEMORY),
                 inflight_bytes: int | None = None, fetch_limit: int = 16,
                 background_limit: int = 12, timeout: float = config.DEFAULT_READ_TIMEOUT) -> None:
        if inflight_bytes is None:  # --memory promises "as much again for data in flight"
            inflight_bytes = memory_bytes
        self.store = store
        self.cache = cache
        self.counters = Counters()
        self.memory_bytes = memory_bytes
        self._lru: OrderedDict[str, bytes] = OrderedDict()
        self._lru_size = 0
        self._flights: dict[str, _Flight] = {}
        self._fetch_limiter = trio.CapacityLimiter(fetch_limit)
        self._disk_limiter = trio.CapacityLimiter(DISK_THREADS)
        self._inline_after = 0.0  # block reads run on the event loop from then on (get_part)
        # Background loads (a recognised load's stream, --prefetch all) hold at most all but one
        # disk slot: a reader's own miss never waits behind a queue of them.
        self._disk_background = trio.CapacityLimiter(DISK_THREADS - 1)
        self._background = trio.CapacityLimiter(background_limit)
        self._budget = ByteBudget(inflight_bytes)
        self.timeout = timeout
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlfs-cache-write")
        self._write_slots = threading.BoundedSemaphore(16)
        # Chunks the kernel's page cache holds (mlfs.fs pushed them) leave memory once the disk
        # cache has them too (drop_when_cached).  Fetch threads and cache writers change these sets,
        # the trio thread reads them; single set operations are atomic under the GIL.
        self._writing: set[str] = set()  # fetched, waiting for their admission to the disk cache
        self._unadmitted: set[str] = set()  # fetched, refused by the disk cache, in memory
        self._drop_when_written: set[str] = set()
        self._token: trio.lowlevel.TrioToken | None = None

    # -- memory LRU (trio thread only) -----------------------------------------------------------
    def peek(self, chunk_id: str) -> bytes | None:
        data = self._lru.get(chunk_id)
        if data is not None:
            self._lru.move_to_end(chunk_id)
        return data

    def _remember(self, chunk_id: str, data: bytes) -> None:
        if chunk_id in self._lru or len(data) > self.memory_bytes:
            return
        self._lru[chunk_id] = data
        self._lru_size += len(data)
        while self._lru_size > self.memory_bytes:
            old_id, old = self._lru.popitem(last=False)
            self._lru_size -= len(old)
            self._unadmitted.discard(old_id)

    def _forget(self, chunk_id: str) -> None:
        self._drop_when_written.discard(chunk_id)
        data = self._lru.pop(chunk_id, None)
        if data is not None:
            self._lru_size -= len(data)
            self._unadmitted.discard(chunk_id)

    def drop_when_cached(self, chunk_id: str) -> None:
        """No read will want *chunk_id* from memory: it is in the kernel's page cache now (a
        push), or it was fetched for the disk cache alone (a shard fetched ahead of its load).
        Drop it from memory, at once if it came from the disk cache, else as soon as the disk
        cache has admitted it (a read the page cache misses then finds it on disk, never needing
        a second GET); never if the disk cache refused it.

        A pushed chunk kept was a second copy of bytes the page cache holds, and every chunk of a load
        after the first ``--memory`` worth landed in fresh memory: page faults were ~10% of the
        mount's CPU in a cold load.  Dropped, its memory is used again by the next chunk
        (docs/adr/0024)."""
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        self._drop_when_written.add(chunk_id)
        # The writer takes the id out of _writing before it looks at _drop_when_written (and puts
        # a refused one in _unadmitted before either); this adds it to _drop_when_written before
        # it looks at _writing, then _unadmitted: at least one of the two sees the other.
        if chunk_id in self._writing:
            return
        if chunk_id in self._unadmitted:
            self._drop_when_written.discard(chunk_id)
            return
        self._forget(chunk_id)

    def in_flight(self, chunk_id: str) -> bool:
        return chunk_id in self._flights

    # -- the one entry point ---------------------------------------------------------------------
    async def get(self, chunk_id: str, size: int | None, *, background: bool = False) -> bytes:
        """The verified bytes of a chunk (``size=None`` where no manifest tells it: the bytes are
        still checked against the id).  Raises MlfsError (StoreError, CorruptChunk...)."""
        data = self.peek(chunk_id)
        if data is not None:
            self.counters.memory_hits += 1
            return data
        flight = self._flights.get(chunk_id)
        if flight is None:
            flight = _Flight()
            self._flights[chunk_id] = flight
            try:
                with trio.fail_after(self.timeout):
                    flight.data = await self._load(chunk_id, size, background)
                self._remember(chunk_id, flight.data)
            except trio.TooSlowError:
                flight.error = StoreError(f"chunk {chunk_id[:16]}: no answer within {self.timeout:.0f}s")
                self.counters.fetch_errors += 1
            except MlfsError as e:
                flight.error = e
            except Exception as e:  # noqa: BLE001 - an unforeseen failure costs this read, not the mount
                log.exception("unexpected failure loading chunk %s", chunk_id[:16])
                flight.error = StoreError(f"chunk {chunk_id[:16]}: {type(e).__name__}: {e}")
                self.counters.fetch_errors += 1
            finally:
                del self._flights[chunk_id]
                flight.event.set()
        else:
            await flight.event.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    @contextlib.asynccontextmanager
    async def disk_slot(self):
        """Hold one of the disk cache's background slots (a stream reading chunk files on its
        own, mlfs.dataplane): a reader's own miss still finds one free."""
        async with self._disk_background, self._disk_limiter:
            yield

    async def _load(self, chunk_id: str, size: int | None, background: bool) -> bytes:
        async with self.disk_slot() if background else self._disk_limiter:
            data = await trio.to_thread.run_sync(self._cache_get, chunk_id, size)
        if data is not None:
            self.counters.disk_hits += 1
            return data
        self.counters.cache_misses += 1
        if self.store is None:
            raise StoreError(f"chunk {chunk_id[:16]} is not cached and no store is configured")
        budget = config.PIECE_SIZE if size is None else size
        await self._budget.acquire(budget)
        try:
            if background:
                async with self._background:
                    return await self._fetch(chunk_id, size)
            return await self._fetch(chunk_id, size)
        finally:
            await self._budget.release(budget)

    async def _fetch(self, chunk_id: str, size: int) -> bytes:
        async with self._fetch_limiter:
            return await trio.to_thread.run_sync(self._fetch_sync, chunk_id, size,
                                                 abandon_on_cancel=True)

    async def get_part(self, chunk_id: str, size: int, start: int, end: int):
        """Bytes ``[start, end)`` of a chunk not in memory, read and checked block by block from
        the disk cache where it can (ChunkCache.get_part: a chunk this process has read whole
        before); None otherwise, and the caller loads the chunk whole.  Nothing is kept in
        memory: such a read is a page the kernel let go of, not the start of a chunk's reads.
        A small one is read on the event loop while no other disk load runs (INLINE_PART_MAX)."""
        if not self.cache.has_blocks(chunk_id):
            return None
        if (INLINE_PART_READS and end - start <= INLINE_PART_MAX
                and self._disk_limiter.borrowed_tokens == 0
                and time.monotonic() >= self._inline_after):
            started = time.monotonic()
            data = self.cache.get_part(chunk_id, size, start, end, flush=False)
            took = time.monotonic() - started
            if took > INLINE_SLOW:
                self._inline_after = time.monotonic() + INLINE_BACKOFF
                log.info("a block read took %.0f ms: block reads go to worker threads for %.0f s",
                         took * 1e3, INLINE_BACKOFF)
            return data
        async with self._disk_limiter:
            return await trio.to_thread.run_sync(self.cache.get_part, chunk_id, size, start, end)

    async def get_parts(self, wanted: list[tuple[str, int, int, int]]) -> list[memoryview | None]:
        """For each ``(chunk id, size, start, end)`` of *wanted*, bytes ``[start, end)`` read and
        checked block by block from the disk cache (as get_part), or None where the chunk's block
        checksums are not known, even to the cache's index, or a block does not match.  A chunk
        too small to have block checksums (cache.SMALL_CHUNK) is read whole and checked by its
        seal.  All in one worker thread, as background work: a reader's own miss finds a disk
        slot free."""
        def one(cid: str, size: int, a: int, b: int) -> memoryview | None:
            part = self.cache.get_part(cid, size, a, b, flush=False)
            if part is None and size < SMALL_CHUNK and not self.cache.has_blocks(cid):
                whole = self.cache.get(cid, size)
                part = None if whole is None else whole[a:b]
            return part

        def run() -> list[memoryview | None]:
            unknown = [w[0] for w in wanted if not self.cache.has_blocks(w[0])]
            if unknown:
                self.cache.load_block_sums(unknown)
            return [one(*w) for w in wanted]
        async with self.disk_slot():
            return await trio.to_thread.run_sync(run)

    def _cache_get(self, chunk_id: str, size: int | None):
        if size is None:  # a caller without a manifest (mlfs serve): the file says the size
            size = self.cache.size_of(chunk_id)
            if size is None:
                return None
        return self.cache.get(chunk_id, size)

    def _fetch_sync(self, chunk_id: str, size: int | None) -> bytes:
        """In a worker thread: GET (with retries), verify, admit to the disk cache.  Another
        mount of the cache fetching the same chunk is waited for instead (ChunkCache.claim), for
        at most a third of the read's time."""
        c = self.counters
        claim, data = (None, None) if size is None else self.cache.claim(
            chunk_id, size, wait=self.timeout / 3)
        if data is not None:
            return data
        try:
            data = self.store.get_chunk_verified(chunk_id, size, deadline=max(1.0, self.timeout - 12))
        except StoreError:
            c.fetch_errors += 1
            self.cache.release(chunk_id, claim)
            raise
        except BaseException:
            self.cache.release(chunk_id, claim)
            raise
        c.chunks_fetched += 1
        c.bytes_fetched += len(data)
        # Admission to the disk cache happens off the read path; the pending queue is bounded, so
        # a disk slower than the network slows fetching down instead of growing memory.
        self._write_slots.acquire()
        self._writing.add(chunk_id)
        try:
            self._writer.submit(self._admit, chunk_id, data, claim)
        except BaseException:  # the writer shut down (an unmount): nothing will admit it
            self._writing.discard(chunk_id)
            self._write_slots.release()
            self.cache.release(chunk_id, claim)
            raise
        return data

    def _admit(self, chunk_id: str, data: bytes, claim: int | None = None) -> None:
        admitted = False
        try:
            # Into the whole copy being written of a file streamed whole, if one wants it
            # (docs/adr/0039); a chunk file otherwise.
            admitted = self.cache.offer(chunk_id, data) or self.cache.put(chunk_id, data)
            if not admitted:
                self.counters.uncached_chunks += 1
        finally:
            if not admitted:
                if len(self._unadmitted) >= 4096:  # ids of chunks too large to stay in memory
                    self._unadmitted.clear()
                self._unadmitted.add(chunk_id)
                self._drop_when_written.discard(chunk_id)
            self._writing.discard(chunk_id)
            self._write_slots.release()
            self.cache.release(chunk_id, claim)  # admitted (or refused): others look again
        token = self._token
        if admitted and chunk_id in self._drop_when_written and token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._forget, chunk_id)

    def wait_written(self, chunk_ids: list[str], timeout: float = 30.0) -> bool:
        """In a worker thread: wait until none of *chunk_ids* is still waiting for its admission
        to the disk cache; False if some still is after *timeout* seconds."""
        ids = set(chunk_ids)
        end = time.monotonic() + timeout
        while not ids.isdisjoint(self._writing):  # one C call under the GIL: no torn reads
            if time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def flush(self) -> None:
        """Wait until every fetched chunk was offered to the disk cache (before unmounting)."""
        self._writer.shutdown(wait=True)
        self.cache.flush_atimes()

    async def warm(self, chunks: list[tuple[str, int, str]], background: bool = False) -> None:
        """Load ``(chunk id, size, file path)`` chunks with bounded concurrency; raise the first
        failure, naming the file (prefetch before readiness, ``--prefetch all``, switch warming)."""
        errors: list[MlfsError] = []
        limiter = trio.CapacityLimiter(16)

        async def one(cid: str, size: int, path: str) -> None:
            async with limiter:
                try:
                    await self.get(cid, size, background=background)
                    if background:
                        self.counters.prefetched_bytes += size
                except MlfsError as e:
                    errors.append(MlfsError(f"cannot fetch {path} (chunk {cid[:16]}): {e}"))

        async with trio.open_nursery() as n:
            for item in chunks:
                n.start_soon(one, *item)
        if errors:
            raise errors[0]

    def snapshot(self) -> dict:
        c = self.counters
        return {
            "bytes_served": c.bytes_served, "bytes_fetched": c.bytes_fetched,
            "chunks_fetched": c.chunks_fetched, "memory_hits": c.memory_hits,
            "disk_hits": c.disk_hits, "cache_misses": c.cache_misses,
            "fetch_errors": c.fetch_errors,
            # What crossed the wire for them: less than bytes_fetched where chunks are stored
            # compressed (mlfs.codec).
            "received_bytes": self.store.received_bytes if self.store else 0,
            "corrupt_chunks": self.store.corrupt_reads if self.store else 0,
            "corrupt_cache_files": self.cache.corrupt, "uncached_chunks": c.uncached_chunks,
            "part_reads": self.cache.part_reads,
            # Whole copies written as their files streamed in (docs/adr/0039).
            "wholes_assembled": self.cache.assemblies_begun,
            "assembled_bytes": self.cache.assembled_bytes,
            "assembled_reads": self.cache.assembled_reads,
            "peer_assembled_reads": self.cache.peer_reads,
            # Misses another mount of the cache was fetching: waited for, or fetched after all.
            "peer_fetch_waits": self.cache.peer_waits,
            "peer_fetch_waits_given_up": self.cache.claims_given_up,
            "salvaged_chunks": self.cache.salvaged_chunks,
            "cache_write_errors": self.cache.write_errors,
            "retries": self.store.retries if self.store else 0,
            "prefetched_bytes": c.prefetched_bytes, "streamed_bytes": c.streamed_bytes,
            "memory_bytes": self._lru_size, "inflight_bytes": self._budget.used,
            "cache_writes_pending": len(self._writing),
        }
