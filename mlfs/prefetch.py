"""The load-aware read path's policy: given the reads of a file so far, is a whole-model load
happening?  Pure: :mod:`mlfs.fs` feeds it reads and acts on its answer (docs/adr/0017).

A loader (``safetensors.load_file`` then a copy, ``load_state_dict``, transformers, llama.cpp)
touches every tensor, one at a time, through mmap, in *its* order: key order (sorted names) or file
order.  Through FUSE that is a chain of page faults, each a round trip, with the link idle between
tensors.  Once a load is recognised the mount streams the rest of the file in the loader's order
(:func:`stream_order`), while the reader's own misses keep their priority.

A reader that takes a few tensors must not pull the model, so the signal is strict: the last
``run`` tensors of at least ``min_tensor`` bytes that the reader finished reading (every block of
them touched) follow each other — each one or two places after the one before — in file order or
in name order (a loader's two orders).  A reader picking k of n large tensors at random meets that
by chance with probability about 2·(2/n)^(run-1) per window: for n = 300 and run = 4, one in three
million.  ``min_tensor`` (2 MiB) is over five times the spill of the kernel's read-ahead past the
end of a tensor (~384 KiB at the default 128 KiB window, docs/adr/0018), so read-ahead never
finishes the next tensor, and small tensors (norms, biases) are not counted at all.  A file with fewer than ``run`` large tensors is left to the lazy
path (and to ``--prefetch all``).

Some loaders first make every tensor (touching the first page of each, in file order) and copy
them afterwards: ``safetensors.torch.load_file`` does.  Their first pass finishes no tensor, and
each touch is a round trip for the tensor's head, so a second signal is the *starts*: the last
``start_run`` (8) large tensors whose first byte was read follow each other the same way.  Read-ahead
past the end of a tensor touches the next one's start, so a random reader's starts come in pairs
(its pick, then the neighbour) and never make a run of eight.

Large checkpoints come in shards (``model-00001-of-00004.safetensors`` and on; PyTorch ``.bin``
shards and llama.cpp's GGUF splits are named the same way), and loaders take them one after the
other in that order.  Each shard's load is recognised on its own, so between two of them the link
went idle: the loader finished the last tensors of one, opened the next and made the reads that
show a load (0.12-0.38 s a shard on a 1 Gbit/s link).  Once a load of a shard is recognised and its
stream has handed out its last chunk, the mount fetches the next shard (:func:`next_shard`) into
the disk cache, so the loader finds it there (docs/adr/0033).  Only one shard ahead: a loader that
stops after one shard costs one shard more, never the model.
"""

from __future__ import annotations

import posixpath
import re
from bisect import bisect_right
from typing import Callable

from .manifest import FileEntry

#: How many finished tensors in a row, each one or two places after the last, make a load.
LOAD_RUN = 4
#: How many tensor starts in a row make one (a loader that makes every tensor before copying).
START_RUN = 8
#: The same for a file most of whose chunks are in the disk cache: streaming it costs a read of the
#: local disk, not the network, so a false start is cheap, and a warm load is recognised 20-30 ms
#: sooner (2 and 4 against 4 and 8: 0.016-0.028 s after open against 0.028-0.059 s, docs/adr/0029).
WARM_RUN = 2
WARM_START_RUN = 4
#: How far apart (in places) two tensors finished one after the other may be.
MAX_STEP = 2
#: Tensors smaller than this are not counted (read-ahead could finish them as a side effect).
MIN_TENSOR = 2 << 20
#: Coverage is tracked in blocks of this size.
BLOCK = 128 << 10


class LoadDetector:
    """Watches the reads of one file (all its handles) and says when a load is happening."""

    def __init__(self, entry: FileEntry, *, run: int = LOAD_RUN, start_run: int = START_RUN,
                 min_tensor: int = MIN_TENSOR, block: int = BLOCK) -> None:
        big = sorted((b, e, name) for name, (b, e, _) in (entry.tensors or {}).items()
                     if e - b >= min_tensor)
        self.begins = [b for b, _, _ in big]
        self.ends = [e for _, e, _ in big]
        by_name = sorted(range(len(big)), key=lambda i: big[i][2])
        self.name_rank = [0] * len(big)
        for rank, i in enumerate(by_name):
            self.name_rank[i] = rank
        self.run = run
        self.start_run = start_run
        self.block = block
        self.loading = False
        self.order = ""  # once loading: "file" or "name", the order the loader goes in
        self.by_starts = False  # ... and whether the starts said so (a loader touching heads first)
        self._touched: dict[int, set[int]] = {}  # tensor → blocks touched, until finished
        self._finished: set[int] = set()
        self._order: list[int] = []  # tensors in the order they were finished (the last run)
        self._started: set[int] = set()
        self._starts: list[int] = []  # tensors in the order their first byte was read (last run)

    @property
    def enabled(self) -> bool:
        return len(self.begins) >= self.run

    def observe(self, start: int, end: int) -> bool:
        """Record a read of ``[start, end)``; True exactly once, when a load is recognised."""
        if self.loading or not self.enabled or end <= start:
            return False
        i = max(bisect_right(self.begins, start) - 1, 0)
        while i < len(self.begins) and self.begins[i] < end:
            b, e = self.begins[i], self.ends[i]
            if start <= b < end and i not in self._started:
                self._started.add(i)
                self._starts = (self._starts + [i])[-self.start_run:]
                if len(self._starts) == self.start_run and self._in_order(self._starts):
                    self.loading = self.by_starts = True
                    return True
            if e > start and i not in self._finished:
                first = (max(start, b) - b) // self.block
                last = (min(end, e) - 1 - b) // self.block
                blocks = self._touched.setdefault(i, set())
                blocks.update(range(first, last + 1))
                if len(blocks) == (e - b + self.block - 1) // self.block:
                    del self._touched[i]
                    self._finished.add(i)
                    self._order = (self._order + [i])[-self.run:]
                    if len(self._order) == self.run and self._in_order(self._order):
                        self.loading = True
                        return True
            i += 1
        return False

    def _in_order(self, o: list[int]) -> bool:
        """Whether tensors *o* follow each other in file order or in name order (and which)."""
        if all(0 < b - a <= MAX_STEP for a, b in zip(o, o[1:])):
            self.order = "file"
            return True
        ranks = [self.name_rank[i] for i in o]
        if all(0 < b - a <= MAX_STEP for a, b in zip(ranks, ranks[1:])):
            self.order = "name"
            return True
        return False


def stream_order(entry: FileEntry, order: str, heads_first: bool = False) -> list[int]:
    """The chunk indices of *entry* in the order a loader going in *order* ("file" or "name")
    will want them: by name, each tensor's chunks in turn (a chunk shared by two tensors comes
    with the first), then whatever no tensor covers (header, gaps) in file order.

    *heads_first* (a load recognised by its starts): the chunk holding each tensor's first byte
    comes before any other, in the same order.  Such a loader touches every tensor's head before
    it copies anything; bringing the heads first lets its copy run beside the rest of the stream
    instead of after it (docs/adr/0021)."""
    offsets = entry.offsets
    spans = sorted((b, e, name) for name, (b, e, _) in (entry.tensors or {}).items() if e > b)
    if order == "name":
        spans.sort(key=lambda s: s[2])
    elif not heads_first or not spans:
        return list(range(len(entry.chunk_ids)))
    seq: list[int] = []
    seen: set[int] = set()

    def add(i: int) -> None:
        if i not in seen:
            seen.add(i)
            seq.append(i)
    if heads_first:
        for b, _, _ in spans:
            add(max(bisect_right(offsets, b) - 1, 0))
    if order == "name":
        for b, e, _ in spans:
            i = max(bisect_right(offsets, b) - 1, 0)
            while i < len(offsets) and offsets[i] < e:
                add(i)
                i += 1
    for i in range(len(entry.chunk_ids)):
        add(i)
    return seq


_SHARD = re.compile(r"(?P<stem>.+)-(?P<k>\d+)-of-(?P<n>\d+)(?P<ext>\.[^.]+)?")


def next_shard(path: str, exists: Callable[[str], bool]) -> str | None:
    """The path of the shard a loader takes after *path* — ``d/model-00003-of-00004.safetensors``
    after ``d/model-00002-of-00004.safetensors``, the number written as wide as the one it follows
    — if *exists* says there is such a file; else None (the last shard, or not a shard)."""
    head, name = posixpath.split(path)
    m = _SHARD.fullmatch(name)
    if m is None:
        return None
    k, n = int(m["k"]), int(m["n"])
    if k >= n:
        return None
    nxt = posixpath.join(head, f"{m['stem']}-{k + 1:0{len(m['k'])}d}-of-{m['n']}{m['ext'] or ''}")
    return nxt if exists(nxt) else None
