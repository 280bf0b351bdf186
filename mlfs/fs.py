"""The FUSE operations: a thin, read-only view of a :class:`Tree` backed by a :class:`ChunkSource`.

pyfuse3's contract is that a handler raises nothing but ``FUSEError``; anything else would kill the
mount.  ``_guard`` is the one place where our exceptions become an errno (and get logged).

Files never change under an inode, so opens keep the kernel page cache (``keep_cache``) and entries
and attributes are cached by the kernel for an hour: ``stat``/``ls`` are answered from the tree in
memory and never touch the network.

Inodes of earlier versions (after a switch or a catalog poll) stay answerable while the kernel knows
them: every ``lookup`` and every entry ``readdir`` hands out counts one reference, ``forget`` drops
them, and a *retired* inode is released once the kernel has forgotten it and no handle is open on
it.  So per-mount memory follows what the kernel holds, not the number of switches.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import mmap
import os
import time
from bisect import bisect_right
from collections import OrderedDict, deque
from dataclasses import dataclass

import pyfuse3
import trio

from . import config, dataplane, directio, pagecache, passthrough
from .cache import BLOCK, SEAL, SMALL_CHUNK
from .client import STATS_XATTR
from .errors import MlfsError
from .fetch import ChunkSource
from .manifest import FileEntry
from .prefetch import WARM_RUN, WARM_START_RUN, LoadDetector, next_shard, stream_order
from .supervise import Supervisor
from .tree import ROOT_INODE, Inodes, Node, Tree, chunk_slices

log = logging.getLogger("mlfs.fs")

TIMEOUT = 3600.0
#: Files whose tensor spans are kept sorted for ``_tensor_ahead`` (an LRU: a catalog may hold many).
TENSOR_INDEX_FILES = 256
#: Chunks a recognised load keeps in flight while it streams the rest of the file.
STREAM_CONCURRENCY = 12
READAHEAD_MIN = 1 << 20
READAHEAD_MAX = 64 << 20
#: How far into a tensor a read must reach before the rest of the tensor is fetched at once.  A
#: page fault in an mmap reads a window around it, and the kernel's read-ahead a window or two
#: past the end of the tensor the reader wanted: up to ~384 KiB into the next tensor at the
#: default 128 KiB read-ahead (measured, docs/adr/0018).  Reads that shallow are spill, not a
#: reader starting the tensor; they cost the tensor's first chunk (its 512 KiB head), no more.
SPILL = 512 << 10
PAGE = mmap.PAGESIZE  # what notify_store can mark as filled
#: Pages shared by two chunks, kept in part until the other chunk's bytes come (at most this many,
#: each at most a page): see Operations._pages.
REMNANTS = 4096
#: Chunks a stream brought are pushed into the kernel's page cache (``notify_store``) unless
#: ``MLFS_PUSH=0`` (for comparisons): the loader's page faults then find the pages there instead of
#: each waiting for a FUSE round trip (docs/adr/0019).
PUSH = os.environ.get("MLFS_PUSH", "1") != "0"
#: A read of a few pages of a chunk read whole before reads only their blocks (ChunkCache.get_part,
#: docs/adr/0026) unless ``MLFS_PART_READS=0`` (for comparisons).
PART_READS = os.environ.get("MLFS_PART_READS", "1") != "0"
#: A pushed chunk leaves the memory LRU once the disk cache has it (ChunkSource.drop_when_cached,
#: docs/adr/0024) unless ``MLFS_KEEP_PUSHED=1`` (for comparisons).
KEEP_PUSHED = os.environ.get("MLFS_KEEP_PUSHED") == "1"
#: Chunks that read-ahead brought (the rest of a tensor a reader is deep in, sequential
#: read-ahead) are pushed into the page cache too, unless ``MLFS_PUSH_AHEAD=0`` (for
#: comparisons): the reader's next faults in them are then no round trips (docs/adr/0032).
PUSH_AHEAD = os.environ.get("MLFS_PUSH_AHEAD", "1") != "0"
#: Once a load of one shard of a checkpoint is recognised and streamed, the next shard is fetched
#: into the disk cache (mlfs.prefetch.next_shard, docs/adr/0033) unless ``MLFS_NEXT_SHARD=0``
#: (for comparisons).
NEXT_SHARD = os.environ.get("MLFS_NEXT_SHARD", "1") != "0"
#: When a process opens a file that the page cache holds all but a few pages of (it was loaded
#: before), the pages the kernel let go of are read back from the disk cache and pushed at once
#: (Operations._mend, docs/adr/0034), unless ``MLFS_MEND=0`` (for comparisons): each would
#: otherwise be a FUSE round trip in the loader's time.  Only files of at least MEND_MIN bytes.
MEND = os.environ.get("MLFS_MEND", "1") != "0"
MEND_MIN = 4 << 20
#: Runs of missing pages read back (in one worker thread) and pushed per step of a mend, each of
#: at most MEND_RUN pages: a step holds at most 8 MiB.
MEND_BATCH = 32
#: A whole copy (docs/adr/0035) waits for the daemon to have served no read for this long and
#: to stream nothing, but at most WHOLE_QUIET_MAX seconds.
WHOLE_QUIET = 1.0
WHOLE_QUIET_MAX = 30.0
#: Once the mount is ending, copies (begun, or asked for) get this many seconds more; the rest
#: are left to a later mount.
WHOLE_AT_EXIT = 10.0
#: A file streamed in whole from the store is written into its whole copy as its chunks arrive
#: (ChunkCache.begin_assembly, docs/adr/0039), not as chunk files that the copy reads back after
#: the load, unless ``MLFS_ASSEMBLE=0`` (for comparisons).
ASSEMBLE = os.environ.get("MLFS_ASSEMBLE", "1") != "0"
#: An open of a file whose whole copy a switch is writing (docs/adr/0036) waits at most this long
#: for it: the copy reads what the load would read, and the load after it is the kernel's.
WHOLE_OPEN_WAIT = 2.0
MEND_RUN = 64
#: notify_store calls at once.  One thread spent 0.35-0.41 s of a 0.65 s warm stream of 555 MiB in
#: them; two brought the stream to 0.55-0.63 s (docs/adr/0019).  Disk threads (4 or 8) did not matter.
PUSH_THREADS = 2
#: A stream of a file whose chunks are in the disk cache runs in C where mlfs._dataplane is built
#: (docs/adr/0029): this many threads read, check and push, in calls of NATIVE_BATCH chunks (between
#: calls the stream sees whether the file is still open and pushes the pages chunks share).
NATIVE_THREADS = 3
#: How often a read waiting for the C stream's checksums of a chunk looks again (seconds).
NATIVE_POLL = 0.0005
NATIVE_BATCH = 32
#: Files with a larger chunk are streamed in Python: the C threads' buffers are sized for the
#: largest chunk and are not in the memory budget (a manifest may name chunks of up to
#: config.MAX_CHUNK_SIZE; mlfs generate makes them of about config.PIECE_SIZE).
NATIVE_MAX_CHUNK = 4 * config.PIECE_SIZE


def _guard(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except MlfsError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:  # noqa: BLE001 - a bug must cost one request, not the mount
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class _Stream:
    """A recognised load being streamed: the chunks it brought in that no read has asked for yet.
    The stream stays at most ``lead`` bytes of those ahead of the reader, so what it brings is
    still in memory when the reader gets there (a stream running away from a warm reader pushed
    chunks out of the memory LRU before their turn, and they were read from disk twice)."""

    __slots__ = ("pending", "pending_bytes", "moved", "asked", "native", "active", "shared",
                 "sums", "buffers", "slots", "issued", "whole")

    def __init__(self, native: bool = False) -> None:
        self.native = native  # streamed by mlfs.dataplane
        # Fetches in flight (STREAM_CONCURRENCY); the next shard's fetch (Operations._next_shard)
        # takes them over as the last chunks of this file come in.
        self.slots = trio.Semaphore(STREAM_CONCURRENCY)
        # Set once the stream has handed out its last chunk (or stopped); *whole*: it got through
        # the file, no close stopped it.
        self.issued = trio.Event()
        self.whole = False
        # The C stream's current call: chunk index → (job number, where its block checksums go,
        # how many bytes of them); the memory it shares (Operations._native_part): three bytes
        # per job, the block checksums, its read buffers.
        self.active: dict[int, tuple[int, int, int]] = {}
        self.shared = bytearray()
        self.sums = bytearray()
        self.buffers: list[memoryview] = []
        self.pending: dict[int, int] = {}  # chunk index → size
        self.pending_bytes = 0
        self.moved = trio.Event()
        self.asked: set[int] = set()  # chunks a reader asked for while the stream ran

    def consumed(self, i: int) -> None:
        self.asked.add(i)
        size = self.pending.pop(i, None)
        if size is not None:
            self.pending_bytes -= size
            self.moved.set()

    def brought(self, i: int, size: int) -> None:
        if i not in self.pending and i not in self.asked:
            self.pending[i] = size
            self.pending_bytes += size


class _Ends:
    """The bytes at the two ends of a chunk (those on the pages it shares with its neighbours), as
    the C stream hands them back, sliced by offsets in the whole chunk (Operations._edge_pages)."""

    __slots__ = ("size", "head", "tail")

    def __init__(self, size: int, head: bytes, tail: bytes) -> None:
        self.size, self.head, self.tail = size, head, tail

    def __getitem__(self, s: slice) -> bytes:
        a, b = s.start, s.stop
        if b <= len(self.head):
            return self.head[a:b]
        t = self.size - len(self.tail)
        if a >= t:
            return self.tail[a - t:b - t]
        raise IndexError(f"bytes {a}-{b} of a chunk of {self.size} are not at its ends")


@dataclass(slots=True)
class Handle:
    inode: int
    entry: FileEntry  # fixed at open: a handle reads one version to the end, whatever switches
    next_offset: int = 0  # where a sequential reader reads next
    streak: int = 0  # bytes read sequentially so far
    ahead_until: int = 0  # file offset up to which read-ahead was scheduled
    direct: bool = False  # passed through to a whole copy: the kernel serves it (ADR 0035)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, source: ChunkSource, info: dict | None = None, *,
                 inodes: Inodes | None = None, supervisor: Supervisor | None = None,
                 push: bool = False) -> None:
        super().__init__()
        self.tree = tree
        self.source = source
        self.info = info or {}
        self.inodes = inodes  # released numbers of forgotten inodes go back here
        self.supervisor = supervisor or Supervisor()  # runs read-ahead; mount.py gives its nursery
        self.handles: dict[int, Handle] = {}
        self.retired: dict[int, Node] = {}  # nodes of earlier versions the kernel still knows
        self.lookups: dict[int, int] = {}  # the kernel's lookup count per inode
        self.opened: dict[int, int] = {}  # open handles per inode
        self._next_fh = 1
        self._tensor_index: OrderedDict[tuple[str, str], tuple[list[int], list[int]]] = \
            OrderedDict()
        self._loads: OrderedDict[tuple[str, str], LoadDetector] = OrderedDict()  # same bound
        # (file digest, page offset) → {chunk index: its bytes in that page}, for pages a push
        # could not fill because the neighbouring chunk was not in memory.
        self._remnants: OrderedDict[tuple[str, int], dict[int, bytes]] = OrderedDict()
        self._streams: dict[tuple[str, str], _Stream] = {}  # loads being streamed
        # Chunks read-ahead pushed into an open inode's page cache: a stream passes them by.
        # (Per inode: a catalog's alias and its version are two inodes of one file.)
        self._pushed_ahead: dict[int, set[int]] = {}
        # Chunks being fetched ahead of a shard's load (_next_shard): a stream of that shard
        # waits for them and pushes them, as it would its own.
        self._shard_ahead: set[str] = set()
        self.shards_ahead = 0  # next shards fetched ahead of their loads
        self._sums_loaded: OrderedDict[tuple[str, str], None] = OrderedDict()  # _load_sums
        #: Push streamed chunks into the kernel's page cache (only with a kernel session: the
        #: in-process tier has none).
        self.push = push and PUSH
        self._pusher = trio.CapacityLimiter(PUSH_THREADS)  # notify_store calls, in worker threads
        self.pushed_bytes = 0
        self.native_bytes = 0  # streamed by the C data plane (mlfs.dataplane)
        self.push_seconds = 0.0  # time spent in notify_store
        #: The session's /dev/fuse descriptor where pushes go straight to it (mlfs.dataplane);
        #: None: through pyfuse3.notify_store.
        self.fuse_fd: int | None = None
        self.loads_recognised = 0
        #: Inodes whose holes are being filled (_mend) → the pages readers asked for since:
        #: those holes need no filling any more.
        self._mending: dict[int, set[int]] = {}
        self.mends = 0  # opens that found holes in the page cache and filled them
        self.mended_bytes = 0
        #: Passthrough (docs/adr/0035): the session's hook and backing files (mount.py sets it;
        #: the in-process tier has none), and which way each inode's open files go.
        self.kernel: passthrough.Kernel | None = None
        self.routes = passthrough.Routes()
        # Files to consider for a whole copy (by blake3; with the quiet it waits for), and those
        # being considered now.
        self._whole_queue: OrderedDict[str, tuple[FileEntry, float]] = OrderedDict()
        self._whole_pending: set[str] = set()
        # Copies a switch asked for (prepare_wholes), set when considered: opens wait for them.
        self._whole_ready: dict[str, trio.Event] = {}
        self._whole_limit = trio.CapacityLimiter(1)  # one copy written at a time
        self._whole_deadline = math.inf  # monotonic time after which copies are abandoned
        self.passthrough_opens = 0
        self._last_read = 0.0  # monotonic time of the last read through the daemon
        self.wholes: dict[str, int] = {}  # make_whole's outcomes, counted
        self.whole_bytes = 0  # bytes of whole copies written
        self.uid = os.getuid()
        self.gid = os.getgid()

    @property
    def nursery(self) -> trio.Nursery | None:
        return self.supervisor.nursery

    # -- attributes -----------------------------------------------------------------------------
    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = 2 + sum(1 for n in node.children.values() if self.tree.nodes[n].is_dir) \
            if node.is_dir else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_size = node.size if not node.is_dir else 0
        a.st_blksize = 1 << 20
        a.st_blocks = (a.st_size + 511) // 512
        t = self.tree.mtime_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode) or self.retired.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def flip(self, new: Tree) -> None:
        """Serve *new* from now on (one assignment: atomic for every handler).  Inodes of the old
        tree that the new one lacks stay answerable while the kernel or an open handle knows them;
        the others are released at once."""
        old = self.tree
        self.tree = new
        for ino in list(old.nodes):
            if ino not in new.nodes:
                self.retired[ino] = old.nodes[ino]
                self._maybe_release(ino)
        for ino in list(self.retired):
            if ino in new.nodes:  # back in the tree (switched back): no longer retired
                del self.retired[ino]
        live = {(f.path, f.blake3) for f in new.files}
        for index in (self._tensor_index, self._loads):
            for key in [k for k in index if k not in live]:
                del index[key]

    def _maybe_release(self, ino: int) -> None:
        if ino in self.retired and not self.lookups.get(ino) and not self.opened.get(ino):
            del self.retired[ino]
            self._pushed_ahead.pop(ino, None)  # the number may come back as another file
            if self.inodes is not None:
                self.inodes.release(ino)

    def _looked_up(self, ino: int) -> None:
        if ino != ROOT_INODE:
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def forget(self, inode_list):
        # Must not raise (pyfuse3's contract): it answers no request.
        try:
            for ino, n in inode_list:
                left = self.lookups.get(ino, 0) - n
                if left > 0:
                    self.lookups[ino] = left
                else:
                    self.lookups.pop(ino, None)
                    self._maybe_release(ino)
        except Exception:  # noqa: BLE001
            log.exception("internal error in forget")

    @_guard
    async def getattr(self, inode, ctx=None):
        return self._attr(self._node(inode))

    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        node = self.tree.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = self._attr(node)
        self._looked_up(node.inode)
        return attr

    @_guard
    async def opendir(self, inode, ctx):
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        for i in range(start_id, len(node.names)):
            child = self._node(node.children[node.names[i]])
            if not pyfuse3.readdir_reply(token, os.fsencode(child.name), self._attr(child), i + 1):
                break
            self._looked_up(child.inode)

    async def releasedir(self, fh):
        pass

    @_guard
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        total = self.tree.size
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- xattrs: the control channel that adds nothing to directory listings ----------------------
    @_guard
    async def getxattr(self, inode, name, ctx):
        if inode == ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []

    def stats(self) -> dict:
        m = self.tree.manifest
        current = {"id": m.id, "version": m.version, "digest": m.digest} if m else \
            {"id": None, "version": "catalog", "digest": None}
        return {**self.info, **current, **self.source.snapshot(), **self.supervisor.snapshot(),
                "pushed_bytes": self.pushed_bytes, "push_seconds": round(self.push_seconds, 3),
                "streamed_in_c": self.native_bytes,
                "loads_recognised": self.loads_recognised, "shards_ahead": self.shards_ahead,
                "mends": self.mends, "mended_bytes": self.mended_bytes,
                "passthrough": self.kernel.describe() if self.kernel else "off: no kernel session",
                "passthrough_opens": self.passthrough_opens,
                "whole_files": dict(self.wholes), "whole_bytes": self.whole_bytes,
                "whole_files_pending": len(self._whole_queue) + len(self._whole_pending),
                "open_files": len(self.handles), "known_inodes": len(self.lookups),
                "retired_inodes": len(self.retired)}

    # -- files ----------------------------------------------------------------------------------
    @_guard
    async def open(self, inode, flags, ctx):
        # First thing, before any await: the hook's last OPEN is this one (docs/adr/0035).
        unique = self.kernel.open_unique() if self.kernel and self.kernel.active else None
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if unique is not None and node.entry is not None:
            ready = self._whole_ready.get(node.entry.blake3)
            if ready is not None and node.entry.blake3 in self._whole_pending:
                with trio.move_on_after(WHOLE_OPEN_WAIT):  # a switch is writing its copy
                    await ready.wait()
        fh = self._next_fh
        self._next_fh += 1
        backing = self._backing(inode, node.entry) if unique is not None else None
        if backing is None and self.routes.backing(inode) is not None:
            # Passthrough stopped while files of this inode are passed through: the kernel
            # would refuse an open through the daemon beside them, and this one cannot be named.
            log.warning("open of inode %d refused: it is passed through, and passthrough has "
                        "stopped (%s)", inode, self.kernel.stopped if self.kernel else "")
            raise pyfuse3.FUSEError(errno.EIO)
        self.routes.open(inode, backing)
        self.handles[fh] = Handle(inode, node.entry, direct=backing is not None)
        self.opened[inode] = self.opened.get(inode, 0) + 1
        if backing is not None:
            self.kernel.expect(unique, fh, backing)
            self.passthrough_opens += 1
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)
        self._load_sums(node.entry)
        if (self.push and MEND and node.entry is not None and node.entry.size >= MEND_MIN
                and inode not in self._mending
                and self.info.get("mountpoint") and self.nursery is not None):
            # (The mend's own open of the file comes back here while the inode is in _mending.)
            self._mending[inode] = set()
            entry = node.entry
            self.supervisor.start(f"filling the page cache's holes in {entry.path}",
                                  lambda: self._mend(inode, entry))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    def _backing(self, inode: int, entry: FileEntry | None) -> int | None:
        """The backing id to pass an open of *inode* through to, or None: through the daemon.
        Its open files decide; with none open, a whole copy in the cache does."""
        if entry is None or self.routes.through_daemon(inode):
            return None
        backing = self.routes.backing(inode)
        if backing is not None or entry.size < passthrough.MIN_SIZE:
            return backing
        path = self.source.cache.whole_file(entry.blake3)
        if path is None:
            return None
        try:
            return self.kernel.register(path, entry.size)
        except OSError as e:  # EPERM without CAP_SYS_ADMIN (a user namespace), or an old kernel
            self.kernel.stop(f"the kernel refused backing file {path}: {e.strerror or e}")
            return None

    def _consider_whole(self, entry: FileEntry, quiet: float = WHOLE_QUIET) -> bool:
        """After a file was read through the daemon: write its whole copy in the background if
        all its chunks are cached and it has none (passthrough.make_whole), once the daemon has
        streamed nothing and served no read for *quiet* seconds.  False if not asked for."""
        if (self.kernel is None or not self.kernel.active or entry.size < passthrough.MIN_SIZE
                or entry.blake3 in self._whole_queue or entry.blake3 in self._whole_pending
                or self.nursery is None):
            return False
        self._whole_queue[entry.blake3] = (entry, quiet)
        self.supervisor.start(f"whole copy of {entry.path}", self._make_whole)
        return True

    def begin_whole(self, entry: FileEntry, direct: bool = True) -> bool:
        """*entry* is about to come in from the store (a load was recognised and streams it, or
        a switch fills the version of a file loaded whole before): write its whole copy as its
        chunks arrive (ChunkCache.begin_assembly), instead of chunk files that the copy reads
        back later.  *direct*: past the page cache (a stream, whose pages the mount pushes
        anyway); a switch's copy goes through it, for the load about to read it (docs/adr/0039).
        True if one is being written."""
        if (not ASSEMBLE or self.kernel is None or not self.kernel.active
                or entry.size < passthrough.MIN_SIZE):
            return False
        return self.source.cache.begin_assembly(
            entry.blake3, entry.size,
            list(zip(entry.chunk_ids, entry.offsets, entry.chunk_sizes)), direct) is not None

    def prepare_wholes(self, entries: list[FileEntry]) -> list[FileEntry]:
        """After a switch (docs/adr/0036): whole copies of *entries*, files of the new version
        that replace one loaded whole, as soon as no load streams through the daemon; an open
        of one of them waits up to WHOLE_OPEN_WAIT for its copy.  Returns those asked for."""
        asked = []
        for e in entries:
            if e.blake3 not in self._whole_ready and self._consider_whole(e, quiet=0.0):
                self._whole_ready[e.blake3] = trio.Event()
                asked.append(e)
        return asked

    async def _make_whole(self) -> None:
        async with self._whole_limit:
            if not self._whole_queue:
                return
            # A copy reads and writes the file's bytes once more: not while a load through the
            # daemon runs (the next shard of a checkpoint, another model), up to a point.  It
            # stays queued meanwhile: at unmount, finish_wholes makes it.
            quiet = next(iter(self._whole_queue.values()))[1]
            give_up = time.monotonic() + WHOLE_QUIET_MAX
            while ((self._streams or time.monotonic() - self._last_read < quiet)
                   and time.monotonic() < give_up):
                await trio.sleep(WHOLE_QUIET / 4)
            if not self._whole_queue:
                return
            digest, (entry, _) = self._whole_queue.popitem(last=False)
            self._whole_pending.add(digest)
            try:
                # Not abandoned by trio at unmount: a copy begun stops at its deadline (ending).
                outcome = await trio.to_thread.run_sync(self._whole_sync, entry)
            finally:
                self._whole_pending.discard(digest)
                ready = self._whole_ready.pop(digest, None)
                if ready is not None:
                    ready.set()
        self._count_whole(entry, outcome)

    def ending(self) -> None:
        """The session ended: copies have WHOLE_AT_EXIT seconds more (finish_wholes)."""
        self._whole_deadline = min(self._whole_deadline, time.monotonic() + WHOLE_AT_EXIT)

    def finish_wholes(self) -> None:
        """At unmount, after the session ended: make the copies asked for that had not begun
        (a load's release comes just before an unmount, often), so that the next mount of the
        same cache passes their files through; within WHOLE_AT_EXIT seconds."""
        self.ending()
        while self._whole_queue:
            _, (entry, _) = self._whole_queue.popitem(last=False)
            self._count_whole(entry, self._whole_sync(entry))
        # Copies begun as files streamed in and never asked for (a file still open at the
        # unmount): their chunks become chunk files, in what time is left.
        self.source.cache.end_assemblies(self._whole_deadline)

    def _count_whole(self, entry: FileEntry, outcome: str) -> None:
        kind = outcome.split(":")[0]
        self.wholes[kind] = self.wholes.get(kind, 0) + 1
        if kind == "made":
            self.whole_bytes += entry.size
            log.info("%s: whole copy made; later opens are passed through", entry.path)
        elif kind in ("damaged", "failed"):
            log.warning("%s: no whole copy: %s", entry.path, outcome)
        else:
            log.debug("%s: no whole copy: %s", entry.path, outcome)

    def _whole_sync(self, entry: FileEntry) -> str:
        # A file just read whole may have chunks on their way to the disk cache.
        self.source.wait_written(entry.chunk_ids)
        return passthrough.make_whole(self.source.cache, entry, self._whole_deadline)

    async def _mend(self, inode: int, entry: FileEntry) -> None:
        """Fill the holes the kernel left in the page cache of *inode*, a file it holds almost
        whole (mlfs.pagecache.holes): read the missing pages' blocks from the disk cache, checked
        (ChunkSource.get_parts), and push them, in file order, while the opener starts reading.
        The kernel let go of these pages one by one (memory pressure, or a DAMON ``pageout``
        scheme); each would otherwise come back as a FUSE read of a page or two, in the loader's
        time.  Pages whose chunk is not in the disk cache, or whose block checksums are unknown,
        are left to the reader's faults."""
        started = time.perf_counter()
        try:
            path = self._path_of(inode)
            if path is None:
                return
            try:
                pages = await trio.to_thread.run_sync(self._residency, path, inode, entry.size,
                                                      abandon_on_cancel=True)
            except OSError as e:  # the mount is going away, or the path is another file by now
                log.debug("page cache of %s: %s", entry.path, e)
                return
            runs = [(p, min(MEND_RUN, first + n - p)) for first, n in pagecache.holes(pages)
                    for p in range(first, first + n, MEND_RUN)]
            if not runs:
                return
            self.mends += 1
            found = time.perf_counter() - started
            before = self.mended_bytes
            faulted = self._mending[inode]
            for k in range(0, len(runs), MEND_BATCH):
                batch = [(p, n) for p, n in runs[k:k + MEND_BATCH]
                         if not faulted.issuperset(range(p, p + n))]
                if not await self._mend_runs(inode, entry, batch):
                    return  # the kernel refused a push: the mount is going away
            log.debug("%s: %d runs of pages were missing from the page cache (found in %.1f ms); "
                      "%d bytes pushed in %.1f ms", entry.path, len(runs), found * 1e3,
                      self.mended_bytes - before, (time.perf_counter() - started) * 1e3)
        finally:
            self._mending.pop(inode, None)

    async def _mend_runs(self, inode: int, entry: FileEntry, runs: list[tuple[int, int]]) -> bool:
        """Read back and push the pages of *runs* (see _mend); False once pushes fail."""
        spans = []  # per run: its file offset and its parts, bytes or a place in `wanted`
        wanted = []  # the parts not in memory, as (chunk id, size, start, end): from the disk
        for first, n in runs:
            begin = first * PAGE
            parts: list = []
            for i, a, b in chunk_slices(entry, begin, min((first + n) * PAGE, entry.size) - begin):
                data = self.source.peek(entry.chunk_ids[i])
                if data is not None:
                    parts.append(memoryview(data)[a:b])
                else:
                    parts.append(len(wanted))
                    wanted.append((entry.chunk_ids[i], entry.chunk_sizes[i], a, b))
            spans.append((begin, parts))
        got = await self.source.get_parts(wanted) if wanted else []
        pieces = []
        for begin, parts in spans:
            have = [got[p] if isinstance(p, int) else p for p in parts]
            if None not in have:  # else left to the reader's fault
                pieces.append((begin, b"".join(have)))
        if not pieces:
            return True
        if not await self._store(inode, pieces, entry.path):
            return False
        self.mended_bytes += sum(len(p) for _, p in pieces)
        return True

    def _path_of(self, inode: int) -> str | None:
        """Where *inode* is in the mount now, or None if the current tree does not hold it."""
        names = []
        node = self.tree.nodes.get(inode)
        while node is not None and node.inode != ROOT_INODE:
            names.append(node.name)
            node = self.tree.nodes.get(node.parent)
        if node is None:
            return None
        return os.path.join(self.info["mountpoint"], *reversed(names))

    @staticmethod
    def _residency(path: str, inode: int, size: int) -> bytes:
        """In a worker thread: what the page cache holds of *path* (pagecache.Residency), or
        nothing if *path* is no longer *inode*.  The open goes through the mount: the event loop
        answers it while this thread waits.  Nothing stays open after it: an unmount must not
        find the daemon holding its own file."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_ino != inode:
                return b""
            residency = pagecache.Residency(fd, size)
            try:
                return residency.resident()
            finally:
                residency.close()
        finally:
            os.close(fd)

    def _load_sums(self, entry: FileEntry | None) -> None:
        """Bring the stored block checksums of a model file's chunks into memory, once per file
        and mount, in the background: its first reads of a few pages then read only their
        blocks, not whole chunks (ChunkCache.load_block_sums)."""
        if entry is None or not entry.tensors or self.nursery is None:
            return
        key = (entry.path, entry.blake3)
        if key in self._sums_loaded:
            return
        self._sums_loaded[key] = None
        while len(self._sums_loaded) > TENSOR_INDEX_FILES:
            self._sums_loaded.popitem(last=False)
        ids = list(entry.chunk_ids)
        self.supervisor.start(f"block checksums of {entry.path}", lambda: trio.to_thread.run_sync(
            self.source.cache.load_block_sums, ids))

    @_guard
    async def read(self, fh, off, size):
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        self._last_read = time.monotonic()
        entry = h.entry
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            started = time.perf_counter()
            log.debug("read %s fh=%d off=%d size=%d", entry.path, fh, off, size)
        slices = chunk_slices(entry, off, size)
        if not slices:
            return b""
        faulted = self._mending.get(h.inode)
        if faulted is not None and size <= MEND_RUN * PAGE:  # a page fault's read, not a stream's
            faulted.update(range(off // PAGE, (off + size - 1) // PAGE + 1))
        stream = self._streams.get((entry.path, entry.blake3)) if self._streams else None
        native: dict[int, bytes] = {}  # chunk → the bytes this read wants, from the C stream
        # A stream in C brings the file faster than read-ahead would: none beside it.
        ahead = stream is None or not stream.native
        if ahead:
            self._readahead(h, off, off + size)
        if entry.tensors:
            self._watch_load(h, off, off + size)
            if stream is not None:
                for i, _, _ in slices:
                    stream.consumed(i)
            if stream is not None and stream.active:
                for i, a, b in slices:
                    if i in stream.active:
                        got = await self._native_part(stream, entry, i, a, b)
                        if got is not None:
                            native[i] = got
        # Pages the kernel let go of, in chunks this mount has read whole before, are read back
        # block by block (docs/adr/0026): then nothing is fetched ahead for them either.
        held = [self.source.peek(entry.chunk_ids[i]) for i, _, _ in slices]
        by_parts = [data is None and self._by_part(entry, i, a, b)
                    for data, (i, a, b) in zip(held, slices)]
        if held[-1] is None and not by_parts[-1] and ahead:
            self._tensor_ahead(entry, off + size, h.inode)
        parts = []
        for (i, a, b), data, by_part in zip(slices, held, by_parts):
            if i in native:
                parts.append(native[i])
                continue
            cid = entry.chunk_ids[i]
            if data is None:
                kept = self._remnant(entry, i, a, b)
                if kept is not None:
                    self.source.counters.memory_hits += 1
                    parts.append(kept)
                    continue
            if data is None and by_part:
                part = await self.source.get_part(cid, entry.chunk_sizes[i], a, b)
                if part is not None:
                    parts.append(part)
                    continue
            if data is None:
                try:
                    data = await self.source.get(cid, entry.chunk_sizes[i])
                except MlfsError as e:
                    # Whatever went wrong with the chunk (missing, corrupt, store down), the read
                    # itself is an I/O error: ENOENT from read() would mean nonsense to callers.
                    log.error("read %s at %d: chunk %d (%s): %s", entry.path, off, i, cid[:16], e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
            else:
                self.source.counters.memory_hits += 1
            parts.append(memoryview(data)[a:b])
        # pyfuse3 takes any buffer: a read inside one chunk is answered without copying it.
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.source.counters.bytes_served += len(out)
        if debug:
            log.debug("read %s off=%d answered in %.1f ms", entry.path, off,
                      (time.perf_counter() - started) * 1e3)
        return out

    async def _native_part(self, stream: _Stream, entry: FileEntry, i: int, a: int,
                           b: int) -> bytes | None:
        """Bytes ``[a, b)`` of chunk *i*, which the C stream's current call has, or None: then
        the read gets them the usual way.

        If no C thread has taken the chunk yet, the read claims it (and loads it; the stream
        leaves it).  If one is reading it, the read waits until it is checked (a few ms), then
        copies its bytes out of that thread's buffer: the thread's push of the chunk may be
        waiting for this very read, as the kernel holds the pages of a read locked until it is
        answered, and a second read of the chunk from disk would only slow the stream down.
        Once the chunk is pushed, its block checksums answer reads of a few of its pages."""
        pos, at, n = stream.active[i]
        shared, sums, buffers = stream.shared, stream.sums, stream.buffers  # even if the call ends
        while True:
            state = dataplane.claim(shared, pos)
            if state == dataplane.READING:
                await trio.sleep(NATIVE_POLL)
                continue
            if state == dataplane.VERIFIED:
                k = dataplane.pin(shared, pos)
                if k < 0:
                    continue  # pushed meanwhile
                try:
                    return bytes(buffers[k][a:b])
                finally:
                    dataplane.unpin(shared, pos)
            if state in (dataplane.RELEASING, dataplane.DONE) and n:
                cid = entry.chunk_ids[i]
                if not self.source.cache.has_blocks(cid):
                    self.source.cache.keep_block_sums(cid, bytes(sums[at:at + n]), store=False)
            return None

    def _by_part(self, entry: FileEntry, i: int, a: int, b: int) -> bool:
        """Whether bytes ``[a, b)`` of chunk *i* are best read as blocks (ChunkSource.get_part):
        a quarter of the chunk at most, its block checksums known, no load of it under way."""
        cid = entry.chunk_ids[i]
        return (PART_READS and (b - a) * 4 <= entry.chunk_sizes[i]
                and self.source.cache.has_blocks(cid) and not self.source.in_flight(cid))

    def _readahead(self, h: Handle, start: int, end: int) -> None:
        """On sequential access, keep chunks loading ahead of the reader.

        The window is twice the bytes read sequentially so far (capped at ``READAHEAD_MAX``) and
        starts only after ``READAHEAD_MIN`` sequential bytes, so reading a header and then one
        tensor (what ``safe_open`` does) fetches no more than that tensor.  Requests the kernel
        issues slightly out of order (async read-ahead) still count as sequential.
        """
        if start == h.next_offset or h.next_offset - (4 << 20) <= start <= h.ahead_until:
            h.streak += end - start
            h.next_offset = max(end, h.next_offset)
        else:
            h.streak = end - start
            h.ahead_until = h.next_offset = end
        if h.streak < READAHEAD_MIN or self.nursery is None:
            return
        target = min(end + min(2 * h.streak, READAHEAD_MAX), h.entry.size)
        if h.entry.tensors:
            # In a file of tensors, sequential read-ahead stops at the end of the tensor being
            # read: a reader that takes a few tensors must not pull their neighbours.  Whole
            # loads are recognised and streamed by mlfs.prefetch instead.
            # Nor into the next tensor before the reads are SPILL bytes deep in it: until then
            # they may be the kernel's read-ahead spilling past the tensor that was wanted.
            span = self._tensor_span(h.entry, end - 1)
            if span is not None:
                target = min(target, span[1] if end - span[0] > SPILL else end)
        if target <= h.ahead_until:
            return
        self._schedule(h.entry, max(end, h.ahead_until), target, h.inode)
        h.ahead_until = target

    def _tensor_span(self, entry: FileEntry, pos: int) -> tuple[int, int] | None:
        """``(begin, end)`` of the tensor holding byte *pos* of *entry*, or None."""
        key = (entry.path, entry.blake3)  # a switch may put another file at the same path
        index = self._tensor_index.get(key)
        if index is None:
            spans = sorted((b, e) for b, e, _ in entry.tensors.values() if e > b)
            index = self._tensor_index[key] = ([b for b, _ in spans], [e for _, e in spans])
            while len(self._tensor_index) > TENSOR_INDEX_FILES:
                self._tensor_index.popitem(last=False)
        else:
            self._tensor_index.move_to_end(key)
        begins, ends = index
        i = bisect_right(begins, pos) - 1
        if i < 0 or ends[i] <= pos:
            return None
        return begins[i], ends[i]

    def _tensor_ahead(self, entry: FileEntry, start: int, inode: int | None = None) -> None:
        """A read that misses inside a tensor starts fetching the rest of that tensor at once.

        Loaders read a tensor whole, but through mmap the kernel asks for it one fault (one
        read-ahead window) at a time; fetching its remaining chunks in parallel turns a chain of
        round trips into one.  Capped at ``READAHEAD_MAX`` bytes.  Only once the reads reach
        ``SPILL`` bytes into the tensor: shallower ones may be the kernel's read-ahead spilling
        past the end of the tensor before it.
        """
        if not entry.tensors or self.nursery is None:
            return
        span = self._tensor_span(entry, start - 1)
        if span is None or span[1] <= start or start - span[0] <= SPILL:
            return
        self._schedule(entry, start, min(span[1], start + READAHEAD_MAX), inode)

    def _watch_load(self, h: Handle, start: int, end: int) -> None:
        """Feed the file's load detector (mlfs.prefetch); once it recognises a whole-model load,
        stream the rest of the file in the background."""
        entry = h.entry
        key = (entry.path, entry.blake3)
        det = self._loads.get(key)
        if det is None:
            # A file in the disk cache is recognised sooner (mlfs.prefetch.WARM_RUN).
            det = self._loads[key] = (LoadDetector(entry, run=WARM_RUN, start_run=WARM_START_RUN)
                                      if self._mostly_cached(entry) else LoadDetector(entry))
            while len(self._loads) > TENSOR_INDEX_FILES:
                self._loads.popitem(last=False)
        if det.observe(start, end) and self.nursery is not None:
            if not self._fits_stream(entry):
                log.info("load of %s recognised, but it is over half the cache: not streamed",
                         entry.path)
                return
            cached = self._mostly_cached(entry)
            heads_first = det.by_starts and not cached
            log.info("load of %s recognised (%s order%s): streaming the rest of it", entry.path,
                     det.order, ", tensor heads first" if heads_first else "")
            self.loads_recognised += 1
            order = stream_order(entry, det.order, heads_first=heads_first)
            stream = self._streams[key] = _Stream(self._native(cached, entry))
            if not stream.native:  # (the C stream reads chunk files the disk cache has)
                self.begin_whole(entry)
            self.supervisor.start(f"stream of {entry.path}",
                                  lambda: self._stream(h.inode, entry, order, stream))
            nxt = self._shard_after(entry)
            if nxt is not None:
                self.supervisor.start(f"fetch of {nxt.path} ahead of its load",
                                      lambda: self._next_shard(stream, nxt, det.order))

    def _fits_stream(self, entry: FileEntry) -> bool:
        """A file is streamed (or fetched ahead) only if it takes at most half the cache."""
        return entry.size <= self.source.cache.max_bytes // 2

    def _entry_at(self, path: str) -> FileEntry | None:
        """The file at *path* in the mounted tree (None: no such file, or a directory)."""
        node = self.tree.by_path(path)
        return None if node is None else node.entry

    def _shard_after(self, entry: FileEntry) -> FileEntry | None:
        """The entry of the shard after *entry* (mlfs.prefetch.next_shard), if the mounted tree
        has it, it fits in half the cache (a stream's own rule) and fetching ahead is on; else
        None."""
        path = next_shard(entry.path, lambda p: self._entry_at(p) is not None) if NEXT_SHARD \
            else None
        nxt = self._entry_at(path) if path else None
        return nxt if nxt is not None and self._fits_stream(nxt) else None

    async def _next_shard(self, stream: _Stream, nxt: FileEntry, order: str) -> None:
        """Fetch the shard a loader takes next into the disk cache, in the order it goes in,
        once the stream of the shard it is loading has handed out its last chunk (so the two do
        not share the link while the loader waits for the first), at most
        ``STREAM_CONCURRENCY`` chunks at a time, as background work.  Stops when the shard's
        own load is recognised (its stream takes over and pushes what is in flight here), when
        the mount switches to a version without it, when the stream was stopped by a close
        before the file's end (no whole-checkpoint load after all), or at the first chunk that
        cannot be had (said once; the read that needs it tries again and reports it)."""
        await stream.issued.wait()
        key = (nxt.path, nxt.blake3)
        if not stream.whole or key in self._streams:
            return
        cache = self.source.cache
        slots = stream.slots
        started, brought = trio.current_time(), 0
        failed: list[str] = []

        async def one(cid: str, size: int) -> None:
            nonlocal brought
            try:
                await self.source.get(cid, size, background=True)
                brought += size
                # Wanted from the disk cache, where the shard's stream will read it: in memory
                # it would push out what the current shard's stream holds for its reader.
                self.source.drop_when_cached(cid)
            except MlfsError as e:
                if not failed:
                    log.warning("fetch of %s ahead of its load stopped: chunk %s: %s", nxt.path,
                                cid[:16], e)
                failed.append(cid)
            finally:
                self._shard_ahead.discard(cid)
                slots.release()

        def current() -> bool:
            now = self._entry_at(nxt.path)
            return (not failed and key not in self._streams and now is not None
                    and now.blake3 == nxt.blake3)

        # What the disk cache lacks, looked up in a worker thread: a stat per chunk, which on
        # a cold disk would hold up the event loop (and every FUSE request) for a large shard.
        todo = await trio.to_thread.run_sync(
            lambda: [i for i in stream_order(nxt, order) if not cache.contains(nxt.chunk_ids[i])])
        async with trio.open_nursery() as n:
            for i in todo:
                cid, size = nxt.chunk_ids[i], nxt.chunk_sizes[i]
                if self.source.peek(cid) is not None or self.source.in_flight(cid):
                    continue
                await slots.acquire()
                if not current():
                    slots.release()
                    break
                self._shard_ahead.add(cid)
                n.start_soon(one, cid, size)
        if brought:
            self.shards_ahead += 1
            self.source.counters.prefetched_bytes += brought
            log.info("fetched %d bytes of %s ahead of its load in %.2fs", brought, nxt.path,
                     trio.current_time() - started)

    def _mostly_cached(self, entry: FileEntry, sample: int = 16) -> bool:
        """Whether most of *entry*'s chunks are in the disk cache (judged on a sample of them).
        Then the stream outruns the loader's copy, and bringing the heads first would only set
        the copy chasing the stream through FUSE reads: measured warm, 1.2-1.4 s against
        0.8-0.9 s in file order (docs/adr/0021).  A few stat calls."""
        n = len(entry.chunk_ids)
        picks = range(0, n, max(1, n // sample))
        return 2 * sum(self.source.cache.contains(entry.chunk_ids[i]) for i in picks) > len(picks)

    async def _stream(self, inode: int, entry: FileEntry, order: list[int],
                      stream: _Stream) -> None:
        """Bring the chunks of *entry* into memory (and the disk cache) in *order* — the order the
        loader goes in — at most ``STREAM_CONCURRENCY`` at a time, as background work (a reader's
        own miss is never queued behind it).  Each chunk no read has asked for yet is pushed into
        the kernel's page cache, where the loader's page faults find it without a round trip to
        this process.  Chunks that could not be pushed wait in memory for their reads, at most
        half the memory budget of them ahead of the reader.  Stops when no handle has the file
        open any more."""
        key = (entry.path, entry.blake3)
        native = stream.native
        # Chunks read-ahead pushed (or is pushing): passed by.  It starts no more pushes now.
        ahead = self._pushed_ahead.setdefault(inode, set())
        lead = max(self.source.memory_bytes // 2, STREAM_CONCURRENCY * max(entry.chunk_sizes))
        slots = stream.slots
        done = flying = 0
        started, pushing = trio.current_time(), self.push_seconds

        async def one(i: int, cid: str, size: int) -> None:
            nonlocal done, flying
            try:
                data = await self.source.get(cid, size, background=True)
                done += size
                stream.brought(i, size)
                if self.push:
                    await self._push(stream, inode, entry, i, data)
            except MlfsError as e:
                log.warning("stream of %s: chunk %s: %s", entry.path, cid[:16], e)
            finally:
                flying -= size
                slots.release()

        try:
            async with trio.open_nursery() as n:
                async def take(i: int, join: bool = False) -> bool:
                    """Chunk *i*'s turn in the stream; False once every handle is closed.
                    *join*: a chunk being fetched is waited for and pushed too (the C stream:
                    there the fetch is a switch's fill, not a reader's own miss)."""
                    nonlocal flying
                    cid, size = entry.chunk_ids[i], entry.chunk_sizes[i]
                    if i in ahead:
                        return True  # read-ahead pushed it into the page cache already
                    if self.source.in_flight(cid) and not join and cid not in self._shard_ahead:
                        return True  # a reader's miss: it gets the chunk from memory as it goes
                    held = self.source.peek(cid)
                    if held is not None:
                        # Read in part already (a loader that first touches every tensor's head),
                        # or shared with a chunk read before: the rest of it goes to the page
                        # cache too, or its next fault may find it gone from memory.
                        if self.push:
                            await self._push(stream, inode, entry, i, held)
                        return True
                    while (stream.pending_bytes + flying + size > lead
                           and self.opened.get(inode)):
                        stream.moved = trio.Event()
                        with trio.move_on_after(1.0):
                            await stream.moved.wait()
                    if not self.opened.get(inode):
                        return False  # every handle closed: the load is over
                    await slots.acquire()
                    if not self.opened.get(inode):  # closed while this waited for a slot
                        slots.release()
                        return False
                    flying += size
                    n.start_soon(one, i, cid, size)
                    return True

                if native:
                    in_c = await self._stream_native(
                        stream, inode, entry, [i for i in order if i not in ahead],
                        lambda i: n.start_soon(take, i, True))
                    done += in_c
                else:
                    for i in order:
                        if not await take(i):
                            break
                stream.whole = bool(self.opened.get(inode))
                stream.issued.set()
            if stream.whole and self.source.cache.assembly(entry.blake3) is not None:
                # Its copy is admitted once the load has gone quiet, not when the file is
                # closed (a server may keep it mapped for days): until then its chunks are in
                # no chunk file another mount of the cache could find (docs/adr/0039).
                self._consider_whole(entry)
        finally:
            stream.issued.set()
            if self._streams.get(key) is stream:
                del self._streams[key]
            self.source.counters.streamed_bytes += done
            log.info("stream of %s: %d bytes brought in %.2fs (%.2fs of it pushing into the page "
                     "cache%s)", entry.path, done, trio.current_time() - started,
                     self.push_seconds - pushing, ", in C" if native else "")

    def _native(self, cached: bool, entry: FileEntry) -> bool:
        """Whether a file is streamed by the C data plane (mlfs.dataplane): built, pushing to
        this session's /dev/fuse, a cache whose seals are trusted and read with O_DIRECT, most
        of the file in it (*cached*: _mostly_cached), and chunks of at most NATIVE_MAX_CHUNK (the
        C threads hold a buffer of the largest each, outside the memory budget)."""
        cache = self.source.cache
        return (cached and self.push and self.fuse_fd is not None and dataplane.NATIVE
                and cache.trust_seals and cache.direct_reads
                and max(entry.chunk_sizes, default=0) <= NATIVE_MAX_CHUNK)

    async def _stream_native(self, stream: _Stream, inode: int, entry: FileEntry,
                             order: list[int], python) -> int:
        """Stream the chunks of *entry* in *order* from the disk cache into the page cache with
        mlfs.dataplane.stream: the file read, checked and pushed by NATIVE_THREADS C threads
        that hold no GIL, in calls of NATIVE_BATCH chunks (docs/adr/0029).  The pages chunks
        share are put together here, as _pages does, and pushed with the next call.  Chunks in
        memory or in flight when their turn comes, not in the disk cache (a new version's), or
        damaged or missing on disk (ChunkSource.get deals with them) are handed to the Python
        stream (*python*: starts a task for the chunk with that index), which fetches them
        beside this one instead of holding it up.  Returns the bytes streamed in C."""
        cache, fd = self.source.cache, self.fuse_fd
        buffers = [directio.aligned_buffer(max(entry.chunk_sizes) + SEAL + 1)
                   for _ in range(NATIVE_THREADS)]
        done = 0
        edges: list[tuple[int, bytes]] = []

        def run(jobs: list[tuple], ids: list[str], spans: list[tuple[int, int]],
                edges: list[tuple[int, bytes]], shared: bytearray, sums: bytearray):
            for offset, page in edges:  # the previous call's shared pages
                try:
                    dataplane.store(fd, inode, offset, page)
                except OSError as e:
                    log.debug("push of %s at %d: %s", entry.path, offset, e)
            if not jobs:
                return [], 0.0
            results, seconds = dataplane.stream(fd, inode, jobs, [view for _, view in buffers],
                                                directio.READ_PIECE, shared, sums)
            for cid, (at, n), (status, *_) in zip(ids, spans, results):
                if status == dataplane.OK:
                    if n:
                        cache.keep_block_sums(cid, bytes(sums[at:at + n]))
                    cache.touch(cid)
            return results, seconds

        todo = deque(order)
        while todo:
            if not self.opened.get(inode):
                return done  # every handle closed: the load is over
            batch, jobs, ids, spans, active, at = [], [], [], [], {}, 0
            while todo and len(batch) < NATIVE_BATCH:
                i = todo.popleft()
                cid = entry.chunk_ids[i]
                if (self.source.in_flight(cid) or self.source.peek(cid) is not None
                        or not cache.has_file(cid)):  # a new version's, or in a whole copy
                    python(i)
                    continue
                job = self._job(entry, i, at)
                n = -(-job[1] // job[3]) * 8 if job[3] else 0  # bytes of block checksums
                active[i] = (len(jobs), at, n)
                batch.append(i)
                ids.append(cid)
                spans.append((at, n))
                jobs.append(job)
                at += n
            stream.active, stream.sums = active, bytearray(at)
            stream.shared = bytearray(3 * len(jobs))  # each job's state, buffer and pins
            stream.buffers = [view for _, view in buffers]
            try:
                async with self.source.disk_slot():
                    results, seconds = await trio.to_thread.run_sync(
                        run, jobs, ids, spans, edges, stream.shared, stream.sums)
            finally:
                stream.active = {}
            edges = []
            self.push_seconds += seconds
            for i, (status, err, head, tail) in zip(batch, results):
                size = entry.chunk_sizes[i]
                if status == dataplane.OK:
                    done += size
                    self.native_bytes += size
                    self.pushed_bytes += size
                    self.source.counters.disk_hits += 1
                    edges += self._edge_pages(entry, i, _Ends(size, head, tail))
                elif status in (dataplane.MISSING, dataplane.DAMAGED, dataplane.TAKEN):
                    # Damaged or gone: ChunkSource.get reads it again, removes a damaged one and
                    # fetches it.  Taken by a read: in memory (or on its way), pushed from there.
                    python(i)
                else:  # the kernel forgot the inode, or the mount is going away
                    log.debug("stream of %s stopped: push failed (%s)", entry.path,
                              os.strerror(err) if err else "skipped")
                    return done
        if edges:
            await trio.to_thread.run_sync(run, [], [], [], edges, bytearray(), bytearray())
        return done

    def _job(self, entry: FileEntry, i: int, sums_at: int) -> tuple:
        """Chunk *i* of *entry* as a job for mlfs.dataplane.stream, its block checksums at
        *sums_at* in the shared buffer."""
        cid, size, off = entry.chunk_ids[i], entry.chunk_sizes[i], entry.offsets[i]
        end = off + size
        first = -(-off // PAGE) * PAGE
        last = end if end == entry.size else end // PAGE * PAGE
        push_from, push_to = (first - off, last - off) if first < last else (0, 0)
        head = min(end, first) - off if off % PAGE else 0
        tail_from = max(off, end // PAGE * PAGE) - off if end % PAGE and end < entry.size else size
        block = BLOCK if size >= SMALL_CHUNK else 0
        return (str(self.source.cache.path(cid)), size, int(cid[:16], 16), block, off,
                push_from, push_to, head, tail_from, sums_at)

    async def _push(self, stream: _Stream | None, inode: int, entry: FileEntry, i: int,
                    data) -> bool:
        """Store chunk *i* of *entry* in the kernel's page cache for *inode* (_store).  A pushed
        chunk no longer counts against the stream's lead (the page cache holds
        it, and the reader's faults will not ask this process for it).  *stream* is None for a
        chunk read-ahead brought.  True if it was pushed."""
        pieces = self._pages(entry, i, data)
        if not pieces or not self.push:
            return False
        if not await self._store(inode, pieces, f"{entry.path} at {entry.offsets[i]}"):
            return False
        self.pushed_bytes += len(data)
        if stream is not None:
            stream.consumed(i)
        if not KEEP_PUSHED:
            self.source.drop_when_cached(entry.chunk_ids[i])
        return True

    async def _store(self, inode: int, pieces: list[tuple[int, object]], what: str) -> bool:
        """Store *pieces* (``(file offset, whole pages)``) in the kernel's page cache for *inode*,
        in a worker thread (the kernel may be holding some of those pages locked for a read only
        the event loop can answer); False if the kernel refused (it forgot the inode, or the
        mount is going away)."""
        fd = self.fuse_fd

        def store() -> float:
            t = time.perf_counter()
            for offset, piece in pieces:
                if fd is None:
                    pyfuse3.notify_store(inode, offset, piece)
                else:
                    dataplane.store(fd, inode, offset, piece)
            return time.perf_counter() - t
        async with self._pusher:
            try:
                self.push_seconds += await trio.to_thread.run_sync(store)
            except OSError as e:
                log.debug("push into %s: %s", what, e)
                return False
        return True

    def _pages(self, entry: FileEntry, i: int, data) -> list[tuple[int, object]]:
        """What to push for chunk *i* (bytes *data*): ``(file offset, bytes)`` pieces made of whole
        pages.  The kernel marks a page as holding data only when one store fills all of it (or
        reaches the end of the file).  Chunks end at tensor boundaries, not on pages, so a page
        shared with a neighbour is pushed whole, put together with the neighbour's bytes, when
        those are in memory.  When they are not, this chunk's part of the page is kept (a
        *remnant*, at most a page) for the neighbour's push to complete: a stream that brings
        every tensor's head first meets its bodies' first pages only after the heads have left
        memory (docs/adr/0021)."""
        off, end = entry.offsets[i], entry.offsets[i] + len(data)
        view = memoryview(data)
        first = -(-off // PAGE) * PAGE  # the middle: whole pages inside the chunk
        last = end if end == entry.size else end // PAGE * PAGE
        out: list[tuple[int, object]] = []
        if first < last:
            out.append((first, view[first - off:last - off]))
        return out + self._edge_pages(entry, i, view)

    def _edge_pages(self, entry: FileEntry, i: int, view) -> list[tuple[int, bytes]]:
        """The pages chunk *i* shares with its neighbours that can be put together now, as
        ``(file offset, bytes)``; its part of the others is kept as a remnant (see _pages).
        *view* is the chunk, or an _Ends of it."""
        off, end = entry.offsets[i], entry.offsets[i] + entry.chunk_sizes[i]
        out: list[tuple[int, bytes]] = []
        for page in {off // PAGE * PAGE if off % PAGE else -1,
                     end // PAGE * PAGE if end % PAGE and end < entry.size else -1} - {-1}:
            page_end = min(page + PAGE, entry.size)
            whole = self._assemble(entry, page, page_end, i, view)
            key = (entry.blake3, page)
            if whole is not None:
                out.append((page, whole))
                self._remnants.pop(key, None)
            else:
                a, b = max(page, off) - off, min(page_end, end) - off
                self._remnants.setdefault(key, {})[i] = bytes(view[a:b])
                self._remnants.move_to_end(key)
                while len(self._remnants) > REMNANTS:
                    self._remnants.popitem(last=False)
        return out

    def _remnant(self, entry: FileEntry, i: int, a: int, b: int) -> bytes | None:
        """Bytes ``[a, b)`` of chunk *i* from the remnant kept of a page it shares with a
        neighbour (see _pages), or None.  A loader that touches a tensor's head before the stream
        has brought the tensor before it asks for exactly such a page: its part in the chunk
        the stream pushed and let go of is here, and a read of the whole chunk from the disk
        (68-126 of them in a cold load of the benchmark's model) is not needed."""
        off = entry.offsets[i]
        page = (off + a) // PAGE * PAGE
        if off + b > page + PAGE:
            return None
        kept = self._remnants.get((entry.blake3, page))
        piece = kept.get(i) if kept else None
        if piece is None:
            return None
        start = max(page, off) - off  # where the remnant starts in the chunk
        if a < start or b > start + len(piece):
            return None
        return piece[a - start:b - start]

    def _assemble(self, entry: FileEntry, begin: int, end: int, i: int, view) -> bytes | None:
        """Bytes ``[begin, end)`` of *entry* from chunk *i* (*view*), chunks in memory and the
        remnants kept of this page; None if some part is in none of them."""
        parts = []
        kept = self._remnants.get((entry.blake3, begin), {})
        for j, a, b in chunk_slices(entry, begin, end - begin):
            if j == i:
                parts.append(view[a:b])
                continue
            chunk = self.source.peek(entry.chunk_ids[j])
            if chunk is not None:
                parts.append(memoryview(chunk)[a:b])
            elif len(kept.get(j, b"")) == b - a:
                parts.append(kept[j])
            else:
                return None
        return b"".join(parts)

    def _schedule(self, entry: FileEntry, begin: int, end: int, inode: int | None = None) -> None:
        """Load the chunks of ``[begin, end)`` of *entry* in the background; with *inode*, push
        each into the page cache once it is in memory."""
        for i, _, _ in chunk_slices(entry, begin, end - begin):
            cid = entry.chunk_ids[i]
            if self.source.peek(cid) is None and not self.source.in_flight(cid):
                self.nursery.start_soon(self._prefetch, cid, entry.chunk_sizes[i], inode, entry, i)

    async def _prefetch(self, cid: str, size: int, inode: int | None = None,
                        entry: FileEntry | None = None, i: int = -1) -> None:
        try:
            data = await self.source.get(cid, size)
            # Read-ahead brings chunks the reader is about to fault on (the rest of the tensor it
            # is deep in): in the page cache its faults are no round trips (docs/adr/0032).  Not
            # once the file is closed, nor where a stream of the file pushes already.
            if (inode is not None and PUSH_AHEAD and self.push and self.opened.get(inode)
                    and (entry.path, entry.blake3) not in self._streams
                    and i not in self._pushed_ahead.get(inode, ())):
                # Marked before the push: a stream that starts meanwhile passes it by.
                pushed = self._pushed_ahead.setdefault(inode, set())
                pushed.add(i)
                if not await self._push(None, inode, entry, i, data):
                    pushed.discard(i)
        except MlfsError as e:
            # The read that needs the chunk will try again and report it; not a background error.
            log.warning("read-ahead of chunk %s failed: %s", cid[:16], e)
        except Exception as e:  # noqa: BLE001 - a bug in read-ahead must not end the mount
            self.supervisor.record(f"read-ahead of chunk {cid[:16]}", e)

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is not None:
            backing = self.routes.close(h.inode, h.direct)
            if backing is not None:
                self.kernel.unregister(backing)
            if not h.direct and h.entry is not None:
                self._consider_whole(h.entry)
            left = self.opened.get(h.inode, 0) - 1
            if left > 0:
                self.opened[h.inode] = left
            else:
                self.opened.pop(h.inode, None)
                # The next load of the file (a restarted server, another process) is a load of its
                # own: watch for it afresh.  (A mapping keeps its handle open until unmapped.)
                self._loads.pop((h.entry.path, h.entry.blake3), None)
                self._pushed_ahead.pop(h.inode, None)
                self._maybe_release(h.inode)

    async def flush(self, fh):
        pass

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True
