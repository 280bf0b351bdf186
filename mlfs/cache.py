"""The on-disk chunk cache shared by every mount on a host.

Layout of a cache directory::

    chunks/<2 hex>/<blake3 hex>   one file per chunk, content-addressed: the bytes, then a seal
    files/<blake3 hex>            whole copies of files (FUSE passthrough, docs/adr/0035); the
                                  chunks of a file with a copy are read from it (docs/adr/0037)
    tmp/                          writers' unique temp files (renamed into chunks/ or files/)
    index.db                      sqlite (WAL): id, size, last access — the LRU and the size
                                  budget; where in a whole copy each of its chunks is

Invariants, and why they hold with several processes at once:

- A chunk file under ``chunks/`` was verified against its blake3 id before it was written, and it
  ends with a seal (XXH3-128 of the bytes, seeded with the id) that is checked every time it is
  loaded: a corrupt or truncated file (disk fault, a crash mid-way through a write that the rename
  made visible, a file copied under another name) is detected, deleted and fetched again.  Wrong
  bytes are never served.  The seal costs ~0.03 s per GiB where re-hashing with blake3 cost ~0.3 s
  (docs/adr/0009); files written before seals existed are still checked with blake3.
- Files are written to a process-unique temp file and renamed into place, so two processes caching
  the same chunk cost only duplicated work, never a torn file.
- Admission and eviction happen in one ``BEGIN IMMEDIATE`` transaction of the shared index, so the
  sum of indexed sizes never exceeds the budget, whatever the number of mounts.
- Eviction unlinks files; a reader that already opened a chunk file keeps reading it (POSIX unlink
  semantics), and loads read a whole chunk at once, so eviction never pulls a chunk from under a read.
- A file present without an index row (a crash between rename and commit) is still valid content;
  ``prune`` reconciles such strays.

Chunk files are written with ``O_DIRECT`` where the file system allows it (:mod:`mlfs.directio`,
docs/adr/0008): a fetched chunk is about to sit in the page cache as part of the mounted file, and
writing it through the page cache costs 1-2 s of kernel CPU per GiB on top.  They are read with
``O_DIRECT`` too (docs/adr/0019): the mounted file's own pages are the page cache that matters, and
a buffered load costs ~0.75 s of kernel CPU per GiB against ~0.2 s.  ``MLFS_DIRECT_READS=0`` reads
through the page cache (for comparisons).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import blake3
import xxhash

from . import buffers, config, dataplane, directio
from .errors import CacheError

log = logging.getLogger("mlfs.cache")


#: Bytes of the seal after each chunk's content in its cache file.
SEAL = 16
#: A chunk read whole is remembered as checksums of blocks of this size, so that a later read of
#: a few pages of it can read and check only their blocks (:meth:`ChunkCache.get_part`).  A page
#: read back costs one block read from the disk: 0.15 ms for 32 KiB here, 0.27 ms for 128 KiB,
#: the size until docs/adr/0034.
BLOCK = 32 << 10
#: Chunks smaller than this get no block checksums: one is read whole about as cheaply.
SMALL_CHUNK = 4 * BLOCK
#: Chunks whose block checksums are remembered (8 bytes per block: 1 KiB per 4 MiB chunk).
BLOCK_TABLES = 16384


#: Index entries (and ``files/`` names) of whole copies of files: ``whole-<the file's blake3>``.
#: No chunk id (hex) starts so.
WHOLE = "whole-"


def seal(chunk_id: str, data) -> bytes:
    """The check stored after a chunk's bytes in its cache file: XXH3-128 of the bytes, seeded with
    the chunk id, so a damaged file or one under another chunk's name fails (docs/adr/0009)."""
    return xxhash.xxh3_128_digest(data, seed=int(chunk_id[:16], 16))


def _private(path: Path) -> bool:
    """True if only this user (or root) can create or replace files in directory *path*."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o022


def _unseal(chunk_id: str, raw: bytes) -> bytes | None:
    """The content of a whole cache file found outside the index (``prune``), or None.

    Rare, so always checked with blake3 against the name: a stray is admitted only if it is the
    chunk, sealed or written before seals existed.
    """
    if len(chunk_id) != 64 or any(c not in "0123456789abcdef" for c in chunk_id):
        return None
    for body in ((raw[:-SEAL],) if len(raw) >= SEAL else ()) + (raw,):
        if blake3.blake3(body).hexdigest() == chunk_id:
            return body
    return None


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection):
    """One write transaction of the index: committed when the block ends (also by a return),
    rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info([{table}])")}


def _tables(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


class Assembly:
    """A whole copy of a file written as its chunks arrive (docs/adr/0039), in ``tmp/`` until it
    is complete, synced and checked (passthrough.make_whole admits it as ``files/<blake3>``).

    A chunk written here is not written as a chunk file as well: until the copy is admitted (or
    given up, when the chunks written are put into chunk files after all: ChunkCache.
    end_assembly), reads that miss the page cache find it here.  Written from the cache's
    writer threads, read from any thread; ``lock`` keeps the descriptor open while either runs.
    """

    def __init__(self, digest: str, size: int, chunks: list[tuple[str, int, int]], tmp: Path,
                 fd: int, direct_fd: int | None) -> None:
        self.digest = digest
        self.size = size
        self.tmp = tmp
        #: The copy open through the page cache, and with ``O_DIRECT`` (None where the file
        #: system refuses it): directio.write_at.
        self.fd = fd
        self.direct_fd = direct_fd
        self.offsets: dict[str, list[int]] = {}
        self.sizes: dict[str, int] = {}
        for cid, off, n in chunks:
            self.offsets.setdefault(cid, []).append(off)
            self.sizes[cid] = n
        #: Chunks written at every offset where the file has them.
        self.written: set[str] = set()
        self.lock = threading.Lock()
        #: Set first when the copy is admitted or given up: no more writes after it.
        self.ending = False
        self.closed = False

    def write(self, chunk_id: str, data) -> bool:
        """Write *chunk_id* (verified bytes) at each of its offsets; False if the copy is being
        admitted or given up.  Raises OSError (the disk)."""
        with self.lock:
            if self.ending:
                return False
            self._write(chunk_id, data)
            self.written.add(chunk_id)
        return True

    def fill(self, chunk_id: str, data) -> None:
        """Write *chunk_id* at each of its offsets, after :meth:`end` too (make_whole writes the
        chunks the copy lacks so).  Raises OSError, also once the copy is closed."""
        with self.lock:
            if self.closed:
                raise OSError(errno.EBADF, "whole copy closed")
            self._write(chunk_id, data)

    def _write(self, chunk_id: str, data) -> None:
        view = memoryview(data).cast("B")
        for off in self.offsets[chunk_id]:
            directio.write_at(self.fd, self.direct_fd, view, off)

    def sync_and_hash(self, deadline: float = float("inf")) -> str | None:
        """Sync the copy to the disk, then read it back (with ``O_DIRECT`` where it can: no
        page cache) and return its blake3; None if *deadline* (``time.monotonic()``) passed.
        Raises OSError."""
        with self.lock:
            if self.closed:
                raise OSError(errno.EBADF, "whole copy closed")
            os.fdatasync(self.fd)
        digest = blake3.blake3()
        pos = 0
        while pos < self.size:
            if time.monotonic() > deadline:
                return None
            with self.lock:  # a piece at a time: reads of its chunks wait for one piece only
                if self.closed:
                    raise OSError(errno.EBADF, "whole copy closed")
                if self.direct_fd is not None:
                    piece = directio.read_piece(self.direct_fd, pos, self.size - pos)
                else:
                    piece = os.pread(self.fd, min(8 << 20, self.size - pos), pos)
            if not piece:
                raise OSError(errno.EIO, f"whole copy: nothing at {pos} of {self.size}")
            digest.update(piece)
            pos += len(piece)
        return digest.hexdigest()

    def read(self, chunk_id: str, start: int, length: int) -> bytes | None:
        """Bytes ``[start, start + length)`` of a chunk written here, unchecked; None if it is
        not (any more)."""
        with self.lock:
            if self.closed or chunk_id not in self.written:
                return None
            try:
                return os.pread(self.fd, length, self.offsets[chunk_id][0] + start)
            except OSError:
                return None

    def end(self) -> None:
        """No more writes (those under way are done when this returns)."""
        with self.lock:
            self.ending = True

    def close(self) -> None:
        with self.lock:
            self.ending = True
            if not self.closed:
                self.closed = True
                os.close(self.fd)
                if self.direct_fd is not None:
                    os.close(self.direct_fd)


class ChunkCache:
    """Thread-safe: every thread gets its own sqlite connection."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.corrupt = 0  # corrupt files found (and removed) by this process
        self.write_errors = 0
        self._local = threading.local()
        # Last-access times waiting to be written: one transaction per batch, not one per load (a
        # write per chunk load held the index's write lock for ~1 s of thread time per warm GiB).
        self._atimes: dict[str, float] = {}
        self._atimes_lock = threading.Lock()
        self._atimes_flushed = time.monotonic()
        # Block checksums of chunks read whole and checked, newest last (get_part).
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._sums_indexed: set[str] = set()  # of those, the ones the index holds (or will)
        self._blocks_lock = threading.Lock()
        self._new_sums: dict[str, bytes] = {}  # for the index, with the atimes
        self._wrong_sums: set[str] = set()  # stored ones found wrong: cleared with the atimes
        self.part_reads = 0  # reads answered from a few blocks of a chunk file
        self.located_reads = 0  # chunks read from whole copies (docs/adr/0037)
        # Whole copies written as their chunks arrive (docs/adr/0039): by the file's blake3, and
        # the chunks written into them, by chunk id.
        self._assemblies: dict[str, Assembly] = {}
        self._assembled: dict[str, Assembly] = {}
        self._assemblies_lock = threading.Lock()
        self.assembled_reads = 0  # chunks read back from a copy being written
        self.peer_reads = 0  # ... from a copy another process of the cache is writing
        self.peer_waits = 0  # misses another process fetched while this one waited (claim)
        self.claims_given_up = 0  # ... or waited for in vain, and fetched after all
        self.assemblies_begun = 0
        self.assembled_bytes = 0  # written into them by offer
        self.salvaged_chunks = 0  # put into chunk files when a copy was given up
        try:
            # What the cache creates only its user can write, whatever the umask (seals, ADR 0009).
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            (self.root / "chunks").mkdir(mode=0o755, exist_ok=True)
            (self.root / "tmp").mkdir(mode=0o755, exist_ok=True)
            (self.root / "fetching").mkdir(mode=0o755, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            #: Chunk files are written past the page cache where the file system allows it
            #: (ADR 0008).
            self.direct = directio.supported(self.root / "tmp")
            #: ... and read past it (ADR 0019); a refusal later switches to buffered reads.
            self.direct_reads = self.direct and os.environ.get("MLFS_DIRECT_READS") != "0"
            self._init_index()
        except OSError as e:
            raise CacheError(f"cannot use cache directory {self.root}: "
                             f"{e.strerror or e} (choose another with --cache-dir)") from None
        except sqlite3.Error as e:
            raise CacheError(f"cannot open the cache index {self.root / 'index.db'}: {e}") from None
        #: Seals are checked on load only where nobody else can write chunk files; elsewhere loads
        #: re-hash with blake3, which cannot be forged (docs/adr/0009).
        self.trust_seals = _private(self.root) and _private(self.root / "chunks")
        #: ... and stored block checksums only where nobody else can write the index either.
        self.index_private = _private(self.root / "index.db")
        if not self.trust_seals:
            log.warning("cache directory %s is writable by other users: every load is re-hashed "
                        "with blake3", self.root)

    def _init_index(self) -> None:
        """Create the index, or bring one written by an older mlfs up to date (any number of
        processes may do this at once: it is one ``BEGIN IMMEDIATE`` transaction)."""
        db = self._db()
        if {"totals", "located", "assembling"} <= _tables(db) and "blocks" in _columns(db, "chunks"):
            return
        with _immediate(db):
            if "chunks" not in _tables(db):
                db.execute("CREATE TABLE chunks ([id] TEXT PRIMARY KEY, [size] INTEGER, [atime] FLOAT)")
                db.execute("CREATE INDEX idx_chunks_atime ON chunks (atime)")
            if "totals" not in _tables(db):
                # The running count and byte total, kept by triggers in the same transaction as
                # every insert and delete, whoever makes it: admission reads one row instead of
                # summing the table (33 ms per admission at 200,000 chunks).
                db.execute("CREATE TABLE totals (one INTEGER PRIMARY KEY CHECK (one = 1), "
                           "count INTEGER NOT NULL, bytes INTEGER NOT NULL)")
                db.execute("INSERT INTO totals SELECT 1, COUNT(*), COALESCE(SUM(size), 0) FROM chunks")
                db.execute("CREATE TRIGGER chunks_added AFTER INSERT ON chunks BEGIN UPDATE totals "
                           "SET count = count + 1, bytes = bytes + NEW.size; END")
                db.execute("CREATE TRIGGER chunks_removed AFTER DELETE ON chunks BEGIN UPDATE totals "
                           "SET count = count - 1, bytes = bytes - OLD.size; END")
            if "blocks" not in _columns(db, "chunks"):
                # The chunk's block checksums (get_part), written with the chunk: a new mount
                # reads a few blocks of a chunk without reading it whole first (docs/adr/0029).
                db.execute("ALTER TABLE chunks ADD COLUMN [blocks] BLOB")
            if "located" not in _tables(db):
                # Chunks read from whole copies (docs/adr/0037): a copy admitted takes the place
                # of its chunks' files, and its rows here go with its own row, however that goes.
                db.execute("CREATE TABLE located ([id] TEXT, [whole] TEXT, [offset] INTEGER, "
                           "[size] INTEGER, PRIMARY KEY (id, whole))")
                db.execute("CREATE INDEX idx_located_whole ON located (whole)")
                db.execute(f"CREATE TRIGGER whole_removed AFTER DELETE ON chunks WHEN OLD.id "
                           f"LIKE '{WHOLE}%' BEGIN DELETE FROM located WHERE whole = "
                           f"substr(OLD.id, {len(WHOLE) + 1}); END")
            if "assembling" not in _tables(db):
                # Chunks written into whole copies still being written (docs/adr/0039, 0040),
                # ``tmp`` being the copy's name in tmp/: other mounts of the cache read them from
                # there (checked with blake3) until the copy is admitted or given up.
                db.execute("CREATE TABLE assembling ([id] TEXT, [tmp] TEXT, [offset] INTEGER, "
                           "[size] INTEGER, PRIMARY KEY (id, tmp))")
                db.execute("CREATE INDEX idx_assembling_tmp ON assembling (tmp)")

    # -- plumbing -------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        """This thread's connection to the index (autocommit; transactions are explicit).  Plain
        sqlite3: a mount pays no import it does not need at start (docs/adr/0017)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.db", timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # the index is a cache: WAL without fsync
            self._local.db = db
        return db

    def close(self) -> None:
        """Close the calling thread's connection to the index (before a fork, or as a thread
        that used the cache ends); the next use opens another."""
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            db.close()

    def path(self, chunk_id: str) -> Path:
        if chunk_id.startswith(WHOLE):
            return self.root / "files" / chunk_id[len(WHOLE):]
        return self.root / "chunks" / chunk_id[:2] / chunk_id

    # -- reads ----------------------------------------------------------------------------------
    def get(self, chunk_id: str, size: int) -> memoryview | None:
        """The chunk's bytes (read-only view), or None if absent or found damaged (then removed)."""
        try:
            data = self._read(chunk_id, size)
        except OSError:  # no chunk file: in a whole copy, perhaps, or in one being written
            return (self._located(chunk_id, size) or self._assembled_chunk(chunk_id, size)
                    or self._peer_chunk(chunk_id, size))
        if data is None:
            self.corrupt += 1
            self._remove(chunk_id)
            return None
        self.touch(chunk_id)
        return data

    #: Last-access times are written in batches of this many, or after this many seconds.
    ATIME_BATCH, ATIME_SECONDS = 256, 2.0

    def touch(self, chunk_id: str, flush: bool = True) -> None:
        """Record a use of *chunk_id* for the LRU (written in batches: flush_atimes)."""
        with self._atimes_lock:
            self._atimes[chunk_id] = time.time()
            due = flush and (len(self._atimes) >= self.ATIME_BATCH
                             or time.monotonic() - self._atimes_flushed >= self.ATIME_SECONDS)
        if due:
            self.flush_atimes()

    def flush_atimes(self) -> None:
        """Write the pending last-access times (the LRU order) in one transaction.  They are a
        hint only: a crash loses at most a batch of them, and eviction order shifts slightly."""
        with self._atimes_lock:
            batch, self._atimes = self._atimes, {}
            sums, self._new_sums = self._new_sums, {}
            wrong, self._wrong_sums = self._wrong_sums, set()
            self._atimes_flushed = time.monotonic()
        if not batch and not sums and not wrong:
            return
        db = self._db()
        try:
            db.execute("BEGIN")
            db.executemany("UPDATE chunks SET atime = ? WHERE id = ?",
                           [(t, cid) for cid, t in batch.items()])
            # Wrong ones first: a chunk whose stored checksums failed and that was then read
            # whole in the same batch gets the new ones.
            db.executemany("UPDATE chunks SET blocks = NULL WHERE id = ?", [(c,) for c in wrong])
            db.executemany("UPDATE chunks SET blocks = ? WHERE id = ? AND blocks IS NULL",
                           [(b, cid) for cid, b in sums.items()])
            db.execute("COMMIT")
        except sqlite3.Error as e:
            log.debug("cache: last-access times not written: %s", e)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def prefault(self) -> int:
        """Fault in the huge-page buffers that reads of whole pieces will take (mlfs.buffers): a
        mount calls it once, in a worker thread, while its first loader is still starting.
        Returns how many were added."""
        if not self.direct_reads:
            return 0
        return buffers.prefault(directio.buffer_bytes(config.PIECE_SIZE + SEAL + 1))

    def size_of(self, chunk_id: str) -> int | None:
        """The content size of a cached chunk (its file less the seal), or None if not cached."""
        try:
            n = self.path(chunk_id).stat().st_size
        except OSError:
            try:  # in a whole copy (docs/adr/0037)
                row = self._db().execute("SELECT size FROM located WHERE id = ? LIMIT 1",
                                         [chunk_id]).fetchone()
            except sqlite3.Error:
                return None
            return row[0] if row else None
        return n - SEAL if n >= SEAL else None

    def _read(self, chunk_id: str, size: int) -> memoryview | None:
        """Read and check one chunk file; None if it is damaged.  Raises OSError if unreadable.

        With ``O_DIRECT`` where the file system takes it (docs/adr/0019), else through the page
        cache; either way one read straight into the buffer that is handed out (no copy), one byte
        longer than a sealed file so that a longer file is caught too.
        """
        want = size + SEAL + 1
        path = self.path(chunk_id)
        if self.direct_reads and self.trust_seals and dataplane.NATIVE:
            try:  # read, seal and block checksums in one C call (docs/adr/0029)
                data, ok, sums = directio.read_sealed(
                    path, size, SEAL, int(chunk_id[:16], 16), BLOCK if size >= SMALL_CHUNK else 0)
            except directio.DirectIOUnsupported:
                self._refuse_direct_reads()
            else:
                if ok is None:  # not a sealed file of this size: the checks below say what it is
                    return self._check(chunk_id, size, data, len(data))
                if not ok:
                    return None
                if sums is not None:
                    self.keep_block_sums(chunk_id, sums)
                return data[:size]
        if self.direct_reads:
            try:
                view = directio.read_direct(path, want)
            except directio.DirectIOUnsupported:
                self._refuse_direct_reads()
        if not self.direct_reads:
            with open(path, "rb", buffering=0) as f:
                raw = f.read(want)  # a fresh bytes object filled by read(2): no zeroing, no copy
                while 0 < len(raw) < want:  # short reads only happen at the end of the file
                    more = f.read(want - len(raw))
                    if not more:
                        break
                    raw += more
            view = memoryview(raw)
        return self._check(chunk_id, size, view, len(view))

    def _refuse_direct_reads(self) -> None:
        log.info("cache %s: O_DIRECT reads refused; reading through the page cache", self.root)
        self.direct_reads = False

    def _check(self, chunk_id: str, size: int, view, got: int) -> memoryview | None:
        data = view[:size]
        if got == size + SEAL:
            if view[size:got] != seal(chunk_id, data):
                return None
            if self.trust_seals:
                self._remember_blocks(chunk_id, data)
                return data
            return data if blake3.blake3(data).hexdigest() == chunk_id else None
        if got == size:  # written before seals (mlfs 0.1): check the content against its id
            return data if blake3.blake3(data).hexdigest() == chunk_id else None
        return None

    # -- reads of a few blocks ------------------------------------------------------------------
    #
    # A page the kernel dropped from a mounted file (memory pressure, or whatever evicts single
    # pages on this VM: docs/adr/0026) comes back as a FUSE read of 4-256 KiB.  Loading its whole
    # 4 MiB chunk to check the seal took 3-5 ms per page; a chunk this process has read whole once
    # is remembered as 8-byte checksums per block (BLOCK), and such a read then reads and checks
    # only its blocks.  Only where seals are trusted (a private cache directory): elsewhere
    # every load is re-hashed with blake3, and so are whole chunks only.
    @staticmethod
    def _block_sums(chunk_id: str, data) -> bytes:
        seed = int(chunk_id[:16], 16)
        # Slices of a view, not 32 KiB copies of the bytes: 0.06 against 0.10 s of CPU per GiB.
        view = memoryview(data).cast("B")
        return b"".join(xxhash.xxh3_64_digest(view[i:i + BLOCK], seed=seed ^ (i // BLOCK))
                        for i in range(0, len(view), BLOCK))

    def _remember_blocks(self, chunk_id: str, data) -> None:
        if len(data) < SMALL_CHUNK:
            return
        self.keep_block_sums(chunk_id, self._block_sums(chunk_id, data))

    def keep_block_sums(self, chunk_id: str, sums: bytes, store: bool = True,
                        indexed: bool = False) -> None:
        """Remember *chunk_id*'s block checksums (from a read whole that matched its seal); with
        *store*, write them to the index too if it has none (a chunk cached by an older mlfs),
        with the next batch of last-access times — unless the index is known to hold these
        (*indexed*: they were just read from it, or written with the chunk's row)."""
        with self._blocks_lock:
            known = chunk_id in self._sums_indexed and self._blocks.get(chunk_id) == sums
            self._blocks[chunk_id] = sums
            self._blocks.move_to_end(chunk_id)
            if indexed or store:
                self._sums_indexed.add(chunk_id)
            while len(self._blocks) > BLOCK_TABLES:
                self._sums_indexed.discard(self._blocks.popitem(last=False)[0])
        if store and not known:
            with self._atimes_lock:
                self._new_sums[chunk_id] = sums

    def load_block_sums(self, chunk_ids: list[str]) -> int:
        """Bring the stored block checksums of *chunk_ids* (those not remembered yet) from the
        index into memory, so that reads of a few of their blocks need no whole read first.
        Only where seals are trusted, the index included.  Returns how many were found."""
        if not self.trust_seals or not self.index_private:
            return 0
        want = [c for c in dict.fromkeys(chunk_ids) if c not in self._blocks]
        found = 0
        db = self._db()
        try:
            for k in range(0, len(want), 500):
                part = want[k:k + 500]
                rows = db.execute(f"SELECT id, size, blocks FROM chunks WHERE blocks IS NOT NULL "
                                  f"AND id IN ({','.join('?' * len(part))})", part).fetchall()
                for cid, size, sums in rows:
                    if len(sums) == -(-(size - SEAL) // BLOCK) * 8:
                        self.keep_block_sums(cid, bytes(sums), store=False, indexed=True)
                        found += 1
                    else:  # of another block size (an older mlfs): cleared, the next whole read
                        with self._atimes_lock:  # stores this one's
                            self._wrong_sums.add(cid)
        except sqlite3.Error as e:
            log.debug("cache: block checksums not read: %s", e)
        return found

    def has_blocks(self, chunk_id: str) -> bool:
        return chunk_id in self._blocks

    def get_part(self, chunk_id: str, size: int, start: int, end: int,
                 flush: bool = True) -> memoryview | None:
        """Bytes ``[start, end)`` of a cached chunk of *size* bytes, read and checked block by
        block; None if its block checksums are not remembered, the file cannot be read, or a
        block does not match (the caller then loads the chunk whole, which finds a damaged file
        and removes it).  ``flush=False``: the read's last-access time waits for the next
        flush (no database write here: the event loop calls it)."""
        sums = self._blocks.get(chunk_id)
        if sums is None or not 0 <= start < end <= size or len(sums) != -(-size // BLOCK) * 8:
            return None
        lo, hi = start // BLOCK, -(-end // BLOCK)
        first, last = lo * BLOCK, min(hi * BLOCK, size)
        asm = self._assembled.get(chunk_id)
        if asm is not None:
            raw = asm.read(chunk_id, first, last - first)
            if raw is None:
                return None
        else:
            try:
                raw = directio.read_range(self.path(chunk_id), first, last - first,
                                          self.direct_reads)
            except OSError:
                return None
        if len(raw) != last - first:
            return None
        seed = int(chunk_id[:16], 16)
        for k in range(lo, hi):
            a = (k - lo) * BLOCK
            if xxhash.xxh3_64_digest(raw[a:a + BLOCK], seed=seed ^ k) != sums[8 * k:8 * k + 8]:
                self._forget_blocks(chunk_id)
                with self._atimes_lock:  # the stored ones are wrong, or the file is: not again
                    self._new_sums.pop(chunk_id, None)
                    self._wrong_sums.add(chunk_id)
                return None
        self.part_reads += 1
        self.touch(chunk_id, flush)
        return raw[start - first:end - first]

    def contains(self, chunk_id: str) -> bool:
        """Whether the chunk is here: as its own file, in a whole copy, or in one being written
        (by this process or another)."""
        return (chunk_id in self._assembled or self.has_file(chunk_id)
                or bool(self._locations(chunk_id)) or bool(self._peer_locations(chunk_id)))

    def has_file(self, chunk_id: str) -> bool:
        return self.path(chunk_id).exists()

    # -- chunks in whole copies (docs/adr/0037) ---------------------------------------------------
    def _locations(self, chunk_id: str) -> list[tuple[str, int]]:
        """The whole copies that hold *chunk_id*: ``(the file's blake3, offset)``."""
        try:
            return self._db().execute(
                "SELECT whole, offset FROM located WHERE id = ?", [chunk_id]).fetchall()
        except sqlite3.Error:
            return []

    @staticmethod
    def _read_checked(path: Path, offset: int, size: int, chunk_id: str) -> bytes | None:
        """*size* bytes at *offset* of the whole copy *path* if they are chunk *chunk_id*
        (blake3: a copy has no seals per chunk), else None.  Raises OSError (FileNotFoundError:
        the copy is gone)."""
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), size, offset)
        return data if len(data) == size and blake3.blake3(data).hexdigest() == chunk_id else None

    def _located(self, chunk_id: str, size: int) -> memoryview | None:
        """The chunk read from a whole copy that holds it, checked with blake3; a copy found
        wrong there is removed, as a damaged chunk file is."""
        for digest, offset in self._locations(chunk_id):
            try:
                data = self._read_checked(self.path(WHOLE + digest), offset, size, chunk_id)
            except FileNotFoundError:  # removed by hand: its row, and its chunks', go too
                self._remove(WHOLE + digest)
                continue
            except OSError:
                continue
            if data is not None:
                self.located_reads += 1
                self.touch(WHOLE + digest)
                return memoryview(data)
            log.warning("cache: whole copy %s is damaged at chunk %s: removed", digest[:16],
                        chunk_id[:16])
            self.corrupt += 1
            self._remove(WHOLE + digest)
        return None

    # -- whole copies written as their chunks arrive (docs/adr/0039) ------------------------------
    def begin_assembly(self, digest: str, size: int, chunks: list[tuple[str, int, int]],
                       direct: bool = True) -> Assembly | None:
        """Start writing the whole copy of the file whose blake3 is *digest* (*size* bytes, made
        of *chunks*, ``(id, offset, size)``) as its chunks are fetched (:meth:`offer`); the one
        begun already, if any.  *direct*: with ``O_DIRECT`` where the file system takes it (no
        page cache: a file streamed whole, whose pages the mount has pushed already); else
        through the page cache (a switch's copy, which a load is about to read).  None where
        whole copies are not kept (others can write the cache), where the file has one, or
        where the disk has no room for it."""
        if not self.trust_seals:
            return None
        with self._assemblies_lock:
            asm = self._assemblies.get(digest)
        if asm is not None:
            return asm
        if self.whole_file(digest, touch=False) is not None:
            return None
        tmp = self.root / "tmp" / f"{WHOLE}{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            log.debug("no whole copy of %s written as it arrives: %s", digest[:16], e)
            return None
        direct_fd = None
        try:
            os.posix_fallocate(fd, 0, size)  # its room now, in few extents, or not at all
            if direct and self.direct:
                direct_fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC | directio.O_DIRECT)
        except OSError as e:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            log.info("no whole copy of %s written as it arrives: %s", digest[:16],
                     e.strerror or e)
            return None
        asm = Assembly(digest, size, chunks, tmp, fd, direct_fd)
        with self._assemblies_lock:
            other = self._assemblies.setdefault(digest, asm)
        if other is not asm:  # another thread began it meanwhile
            asm.close()
            tmp.unlink(missing_ok=True)
        else:
            self.assemblies_begun += 1
        return other

    def assembly(self, digest: str) -> Assembly | None:
        with self._assemblies_lock:
            return self._assemblies.get(digest)

    def offer(self, chunk_id: str, data) -> bool:
        """Write *chunk_id*, fetched and verified, into the whole copies being written that
        want it; True if it went into one (then it needs no chunk file: reads find it there).
        In a cache writer thread."""
        with self._assemblies_lock:
            wanting = [a for a in self._assemblies.values()
                       if chunk_id in a.offsets and chunk_id not in a.written]
        taken = False
        for asm in wanting:
            try:
                if asm.write(chunk_id, data):
                    with self._assemblies_lock:
                        if not asm.ending:  # else end_assembly has it: admitted or salvaged
                            self._assembled[chunk_id] = asm
                            taken = True
                    self.assembled_bytes += len(data)
            except OSError as e:
                self.write_errors += 1
                log.warning("whole copy %s: %s: written as chunk files instead", asm.digest[:16],
                            e.strerror or e)
                self.end_assembly(asm, salvage=True)
        if taken:
            self._note_assembled(chunk_id, len(data), [a for a in wanting if chunk_id in a.written])
        if taken and len(data) >= SMALL_CHUNK and self.trust_seals:
            # A page of it the kernel lets go of is read back as a block (get_part), as for a
            # chunk file.
            self.keep_block_sums(chunk_id, self._block_sums(chunk_id, data), store=False)
        return taken

    def _assembled_chunk(self, chunk_id: str, size: int,
                         asm: Assembly | None = None) -> memoryview | None:
        """The chunk read back from a whole copy being written (*asm*, or the one that holds
        it), checked with blake3."""
        asm = asm or self._assembled.get(chunk_id)
        if asm is None or asm.sizes.get(chunk_id) != size:
            return None
        data = asm.read(chunk_id, 0, size)
        if data is None or len(data) != size or blake3.blake3(data).hexdigest() != chunk_id:
            return None
        self.assembled_reads += 1
        return memoryview(data)

    #: Chunks in copies other processes are writing are read from there (docs/adr/0040) unless
    #: ``MLFS_PEER_READS=0`` (for comparisons).
    PEER_READS = os.environ.get("MLFS_PEER_READS", "1") != "0"

    def _note_assembled(self, chunk_id: str, size: int, into: list[Assembly]) -> None:
        """Tell other mounts of the cache where *chunk_id* now is: the copies *into*, still
        being written (their rows go when the copy is admitted or given up)."""
        try:
            self._db().executemany(
                "INSERT OR REPLACE INTO assembling (id, tmp, offset, size) VALUES (?, ?, ?, ?)",
                [(chunk_id, a.tmp.name, a.offsets[chunk_id][0], size) for a in into])
        except sqlite3.Error as e:  # they fetch it themselves, as before
            log.debug("cache: chunk %s not indexed as being in a copy: %s", chunk_id[:16], e)

    def _forget_assembling(self, tmp_name: str) -> None:
        try:
            self._db().execute("DELETE FROM assembling WHERE tmp = ?", [tmp_name])
        except sqlite3.Error:
            pass

    def _peer_locations(self, chunk_id: str) -> list[tuple[str, int]]:
        """The copies being written that hold *chunk_id*, by any process: ``(name in tmp/,
        offset)``, this process's own left out (:meth:`_assembled_chunk` reads those)."""
        if not self.PEER_READS:
            return []
        try:
            rows = self._db().execute("SELECT tmp, offset FROM assembling WHERE id = ?",
                                      [chunk_id]).fetchall()
        except sqlite3.Error:
            return []
        with self._assemblies_lock:
            own = {a.tmp.name for a in self._assemblies.values()}
        return [r for r in rows if r[0] not in own]

    def _peer_chunk(self, chunk_id: str, size: int) -> memoryview | None:
        """The chunk read from a copy another mount of the cache is writing, checked with
        blake3 (docs/adr/0040).  A copy gone (admitted, or given up) takes its rows with it."""
        for name, offset in self._peer_locations(chunk_id):
            if "/" in name or not name.startswith(WHOLE):  # a row names a copy in tmp/ only
                continue
            try:
                data = self._read_checked(self.root / "tmp" / name, offset, size, chunk_id)
            except FileNotFoundError:
                self._forget_assembling(name)
                continue
            except OSError:
                continue
            if data is not None:
                self.peer_reads += 1
                return memoryview(data)
            log.warning("cache: copy being written %s does not hold chunk %s where the index "
                        "says: not read from it", name[:24], chunk_id[:16])
            self.corrupt += 1
            try:
                self._db().execute("DELETE FROM assembling WHERE id = ? AND tmp = ?",
                                   [chunk_id, name])
            except sqlite3.Error:
                pass
        return None

    # -- fetches under way in other processes of the cache (docs/adr/0040) -------------------------
    def claim(self, chunk_id: str, size: int, wait: float) -> tuple[int | None, memoryview | None]:
        """Before this process fetches *chunk_id* (a miss): take its lock file in ``fetching/``,
        so another mount of the cache that misses it meanwhile waits for this fetch instead of
        making its own.  Returns ``(claim, None)``: fetch it, then :meth:`release` the claim once
        it is admitted (or the fetch failed); ``(None, data)``: another process held the lock and
        the chunk is here now (checked as every read from the cache is); ``(None, None)``: fetch
        it without a claim (no lock to be had, or another process held it for *wait* seconds).
        Never needed for correctness: at worst a chunk is fetched twice."""
        if not self.PEER_READS:
            return None, None
        path = self.root / "fetching" / chunk_id
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError:
                return None, None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    self.claims_given_up += 1
                    return None, None
                time.sleep(0.01)
                data = self.get(chunk_id, size)
                if data is not None:
                    self.peer_waits += 1
                    return None, data
                continue
            except OSError:
                os.close(fd)
                return None, None
            try:  # the file locked may have been released (unlinked) since it was opened
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            # Another process may have admitted it since this one missed it, and released its
            # claim (waited for here, or before this one looked).
            data = self.get(chunk_id, size)
            if data is not None:
                self.release(chunk_id, fd)
                self.peer_waits += 1
                return None, data
            return fd, None

    def release(self, chunk_id: str, claim: int | None) -> None:
        """Give up a :meth:`claim` (the chunk admitted, or its fetch failed)."""
        if claim is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.root / "fetching" / chunk_id)
        os.close(claim)

    def end_assembly(self, asm: Assembly, salvage: bool = False,
                     deadline: float = float("inf")) -> int:
        """Stop writing *asm* (admitted by put_whole, or given up).  With *salvage*, the chunks
        written into it that the cache holds nowhere else become chunk files first (checked
        with blake3 as they are read back), until ``time.monotonic()`` passes *deadline*; the
        copy itself is removed.  Returns how many chunks were salvaged."""
        asm.end()
        self._forget_assembling(asm.tmp.name)
        salvaged = 0
        if salvage:
            for cid in sorted(asm.written):
                if time.monotonic() > deadline:
                    log.info("whole copy %s given up: %d chunks not kept", asm.digest[:16],
                             len(asm.written) - salvaged)
                    break
                if self.has_file(cid) or self._locations(cid):
                    continue
                data = self._assembled_chunk(cid, asm.sizes[cid], asm)
                if data is not None and self.put(cid, data):
                    salvaged += 1
        self.salvaged_chunks += salvaged
        with self._assemblies_lock:
            if self._assemblies.get(asm.digest) is asm:
                del self._assemblies[asm.digest]
            for cid in asm.written:
                if self._assembled.get(cid) is asm:
                    del self._assembled[cid]
                    for other in self._assemblies.values():  # a chunk two copies have
                        if cid in other.written and not other.ending:
                            self._assembled[cid] = other
                            break
        asm.close()
        if salvage:
            asm.tmp.unlink(missing_ok=True)
        return salvaged

    def end_assemblies(self, deadline: float = float("inf")) -> None:
        """At unmount: the whole copies still being written are given up, their chunks kept as
        chunk files until *deadline* (end_assembly)."""
        with self._assemblies_lock:
            left = list(self._assemblies.values())
        for asm in left:
            self.end_assembly(asm, salvage=True, deadline=deadline)

    # -- writes ---------------------------------------------------------------------------------
    def put(self, chunk_id: str, data: bytes) -> bool:
        """Admit a chunk the caller already verified; evict least recently used chunks to make room.

        Returns False (and caches nothing) if the chunk can never fit or the disk refuses the write;
        the caller then serves the bytes without caching them.
        """
        size = len(data) + SEAL  # what the file takes on disk
        if size > self.max_bytes:
            return False
        self.flush_atimes()  # eviction below must see this process's latest accesses
        final = self.path(chunk_id)
        tmp = self.root / "tmp" / f"{chunk_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            try:
                directio.write_file(tmp, data, self.direct, seal(chunk_id, data))
            except directio.DirectIOUnsupported:
                tmp.unlink(missing_ok=True)
                self.direct = False
                directio.write_file(tmp, data, False, seal(chunk_id, data))
        except OSError:
            self.write_errors += 1
            tmp.unlink(missing_ok=True)
            return False
        sums = self._block_sums(chunk_id, data) if len(data) >= SMALL_CHUNK else None
        db = self._db()
        try:
            with _immediate(db):
                if db.execute("SELECT 1 FROM chunks WHERE id = ?", [chunk_id]).fetchone():
                    tmp.unlink(missing_ok=True)
                    return True
                self._make_room(db, size)
                final.parent.mkdir(mode=0o755, exist_ok=True)
                os.replace(tmp, final)
                db.execute("INSERT INTO chunks (id, size, atime, blocks) VALUES (?, ?, ?, ?)",
                           [chunk_id, size, time.time(), sums])
        except (OSError, sqlite3.Error):
            self.write_errors += 1
            tmp.unlink(missing_ok=True)
            return False
        if sums is not None and self.trust_seals:
            # Computed here from verified bytes: a page of this chunk the kernel lets go of is
            # read back as a block, not as the whole chunk (in a cold load, 4 MiB per 4 KiB page).
            self.keep_block_sums(chunk_id, sums, store=False, indexed=True)
        return True

    def _make_room(self, db: sqlite3.Connection, size: int) -> list[str]:
        """Inside an admission's transaction: evict least recently used entries until *size*
        more bytes fit, and return them."""
        total = db.execute("SELECT bytes FROM totals").fetchone()[0]
        excess = total + size - self.max_bytes
        victims: list[str] = []
        if excess > 0:
            for vid, vsize in db.execute("SELECT id, size FROM chunks ORDER BY atime"):
                victims.append(vid)
                excess -= vsize
                if excess <= 0:
                    break
            for vid in victims:
                db.execute("DELETE FROM chunks WHERE id = ?", [vid])
                self.path(vid).unlink(missing_ok=True)
        return victims

    # -- whole files (FUSE passthrough, docs/adr/0035) -------------------------------------------
    def whole_file(self, digest: str, touch: bool = True) -> Path | None:
        """The whole copy of the file whose blake3 is *digest*, if the cache holds one (its use
        counts for the LRU, if *touch*).  Never where others can write the cache: nothing checks a whole
        copy's bytes once admitted (the kernel serves them)."""
        name = WHOLE + digest
        path = self.path(name)
        if not self.trust_seals or not path.is_file() or not _private(path.parent):
            return None
        try:  # only what put_whole admitted: a file put there otherwise is not a checked copy
            if not self._db().execute("SELECT 1 FROM chunks WHERE id = ?", [name]).fetchone():
                return None
        except sqlite3.Error:
            return None
        if touch:  # on the event loop (an open): written with the next batch
            self.touch(name, flush=False)
        return path

    def put_whole(self, digest: str, tmp: Path, chunks: list[tuple[str, int, int]]) -> bool:
        """Admit *tmp*, a whole file already checked against *digest*, made of *chunks*
        (``(id, offset, size)``).  The copy takes the place of those chunks' files: from then
        on they are read from it (docs/adr/0037), and it is evicted as one entry of the LRU, with
        them.  Other entries are evicted as the LRU says to make room for the rest.  False, and
        *tmp* removed, if it cannot be admitted (larger than the cache, the disk)."""
        name = WHOLE + digest
        try:
            size = tmp.stat().st_size
        except OSError:
            return False
        if size > self.max_bytes:
            tmp.unlink(missing_ok=True)
            return False
        replaced: list[str] = []
        try:
            self.flush_atimes()
            (self.root / "files").mkdir(mode=0o755, exist_ok=True)
            db = self._db()
            with _immediate(db):
                if db.execute("SELECT 1 FROM chunks WHERE id = ?", [name]).fetchone():
                    if not self.path(name).is_file():  # removed by hand: this one takes its place
                        os.replace(tmp, self.path(name))
                    tmp.unlink(missing_ok=True)
                    return True
                ids = sorted({cid for cid, _, _ in chunks})
                for i in range(0, len(ids), 500):
                    part = ids[i:i + 500]
                    marks = ",".join("?" * len(part))
                    replaced += [r[0] for r in db.execute(
                        f"SELECT id FROM chunks WHERE id IN ({marks})", part)]
                    db.execute(f"DELETE FROM chunks WHERE id IN ({marks})", part)
                self._make_room(db, size)
                db.execute("DELETE FROM assembling WHERE tmp = ?", [tmp.name])
                os.replace(tmp, self.path(name))
                db.execute("INSERT INTO chunks (id, size, atime) VALUES (?, ?, ?)",
                           [name, size, time.time()])
                db.executemany("INSERT OR REPLACE INTO located (id, whole, offset, size) "
                               "VALUES (?, ?, ?, ?)",
                               [(cid, digest, off, n) for cid, off, n in chunks])
        except (OSError, sqlite3.Error):
            self.write_errors += 1
            tmp.unlink(missing_ok=True)
            return False
        for cid in replaced:  # after the commit: a crash before it leaves them as they were
            self._forget_blocks(cid)
            self.path(cid).unlink(missing_ok=True)
        return True

    def _forget_blocks(self, chunk_id: str) -> None:
        """Drop the block checksums held in memory for *chunk_id* (its file is going, or they
        were found wrong)."""
        with self._blocks_lock:
            self._blocks.pop(chunk_id, None)
            self._sums_indexed.discard(chunk_id)

    def _remove(self, chunk_id: str) -> None:
        self._forget_blocks(chunk_id)
        self.path(chunk_id).unlink(missing_ok=True)
        try:
            self._db().execute("DELETE FROM chunks WHERE id = ?", [chunk_id])
        except sqlite3.Error:
            pass

    # -- maintenance (mlfs cache ...) -----------------------------------------------------------
    def stats(self) -> dict:
        db = self._db()
        count, total = db.execute("SELECT count, bytes FROM totals").fetchone()
        wholes, whole_bytes = db.execute(  # a range of the primary key: no scan
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks WHERE id >= ? AND id < ?",
            [WHOLE, WHOLE[:-1] + chr(ord(WHOLE[-1]) + 1)]).fetchone()
        located = db.execute("SELECT COUNT(DISTINCT id) FROM located").fetchone()[0]
        return {"cache_dir": str(self.root), "chunks": count - wholes, "bytes": total,
                "whole_files": wholes, "whole_file_bytes": whole_bytes,
                "chunks_in_whole_files": located,
                "max_bytes": self.max_bytes}

    def prune(self) -> dict:
        """Evict down to ``max_bytes``, drop index rows without files, index stray files, and
        remove temp files left by dead writers.  Returns what was done."""
        db = self._db()
        removed_rows = stray = strays_removed = tmp_removed = 0
        for (cid,) in list(db.execute("SELECT id FROM chunks")):
            if not self.path(cid).exists():
                db.execute("DELETE FROM chunks WHERE id = ?", [cid])
                removed_rows += 1
        indexed = {cid for (cid,) in db.execute("SELECT id FROM chunks")}
        for sub in (self.root / "chunks").iterdir():
            for f in sub.iterdir():
                if f.name not in indexed:
                    data = _unseal(f.name, f.read_bytes())
                    if data is not None and self.put(f.name, data):
                        stray += 1
                    else:
                        f.unlink(missing_ok=True)
        files = self.root / "files"
        for f in files.iterdir() if files.is_dir() else ():
            if WHOLE + f.name not in indexed:  # a whole copy is only trusted as admitted
                f.unlink(missing_ok=True)
                strays_removed += 1
        cutoff = time.time() - 3600
        for f in (self.root / "tmp").iterdir():
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    tmp_removed += 1
            except FileNotFoundError:
                pass
        for f in (self.root / "fetching").iterdir():  # claims a crash left (claim), if free
            try:
                if f.stat().st_mtime < cutoff:
                    fd = os.open(f, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        f.unlink()
                        tmp_removed += 1
                    finally:
                        os.close(fd)
            except OSError:
                pass
        db.execute(f"DELETE FROM located WHERE '{WHOLE}' || whole NOT IN (SELECT id FROM chunks)")
        for (name,) in list(db.execute("SELECT DISTINCT tmp FROM assembling")):
            if not (self.root / "tmp" / name).exists():
                db.execute("DELETE FROM assembling WHERE tmp = ?", [name])
        # The triggers keep the totals exact; recounting here repairs an index edited by hand.
        db.execute("UPDATE totals SET count = (SELECT COUNT(*) FROM chunks), "
                   "bytes = (SELECT COALESCE(SUM(size), 0) FROM chunks)")
        evicted = self.shrink(self.max_bytes)
        return {"evicted": evicted, "dangling_rows": removed_rows, "strays_indexed": stray,
                "whole_strays_removed": strays_removed,
                "temp_files_removed": tmp_removed, **self.stats()}

    def shrink(self, target: int) -> int:
        db = self._db()
        n = 0
        self.flush_atimes()
        with _immediate(db):
            total = db.execute("SELECT bytes FROM totals").fetchone()[0]
            for vid, vsize in list(db.execute("SELECT id, size FROM chunks ORDER BY atime")):
                if total <= target:
                    break
                db.execute("DELETE FROM chunks WHERE id = ?", [vid])
                self.path(vid).unlink(missing_ok=True)
                total -= vsize
                n += 1
        return n

    def clear(self) -> int:
        n = self.shrink(0)
        for sub in (self.root / "chunks").iterdir():
            shutil.rmtree(sub, ignore_errors=True)
        shutil.rmtree(self.root / "files", ignore_errors=True)
        return n
