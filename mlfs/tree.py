"""A manifest as inodes: directories and files with their attributes (pure)."""

from __future__ import annotations

import stat
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime

from .manifest import FileEntry, Manifest

ROOT_INODE = 1


@dataclass(slots=True)
class Node:
    inode: int
    name: str
    parent: int
    mode: int  # full st_mode
    size: int = 0
    entry: FileEntry | None = None
    children: dict[str, int] = field(default_factory=dict)  # name -> inode (directories)
    names: list[str] = field(default_factory=list)  # sorted, for readdir offsets

    @property
    def is_dir(self) -> bool:
        return self.entry is None


class Inodes:
    """Inode numbers that stay stable across versions.

    A directory keeps its number as long as its path exists; a file keeps its number while its path
    and content (blake3, size, mode) stay the same.  So after a version switch the kernel keeps the
    page cache of every unchanged file, and a changed file gets a new inode whose cache starts empty
    while handles opened on the old inode keep reading the old bytes.
    """

    def __init__(self) -> None:
        self._numbers: dict[tuple, int] = {}
        self._keys: dict[int, tuple] = {}
        self._next = ROOT_INODE + 1

    def get(self, key: tuple) -> int:
        ino = self._numbers.get(key)
        if ino is None:
            ino = self._numbers[key] = self._next
            self._keys[ino] = key
            self._next += 1
        return ino

    def release(self, ino: int) -> None:
        """Forget a number the kernel no longer knows (numbers are never reused: the kernel may
        still hold stale references for a moment, and 64 bits do not run out)."""
        key = self._keys.pop(ino, None)
        if key is not None and self._numbers.get(key) == ino:
            del self._numbers[key]

    def __len__(self) -> int:
        return len(self._numbers)


class Tree:
    """The directory tree of one version (or of a whole catalog), immutable once built."""

    def __init__(self, files: list[FileEntry], inodes: Inodes | None = None, mtime_ns: int = 0,
                 manifest: Manifest | None = None) -> None:
        inodes = Inodes() if inodes is None else inodes
        self.manifest = manifest
        self.files = files
        self.mtime_ns = mtime_ns
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE, stat.S_IFDIR | 0o555)}
        for f in sorted(files, key=lambda f: f.path):
            parent = self.nodes[ROOT_INODE]
            parts = f.path.split("/")
            for i, part in enumerate(parts[:-1]):
                ino = parent.children.get(part)
                if ino is None:
                    ino = inodes.get(("d", "/".join(parts[:i + 1])))
                    self.nodes[ino] = Node(ino, part, parent.inode, stat.S_IFDIR | 0o555)
                    parent.children[part] = ino
                parent = self.nodes[ino]
            ino = inodes.get(("f", f.path, f.blake3, f.size, f.mode))
            self.nodes[ino] = Node(ino, parts[-1], parent.inode, stat.S_IFREG | f.mode, f.size, f)
            parent.children[parts[-1]] = ino
        for node in self.nodes.values():
            node.names = sorted(node.children)
        self.size = sum(f.size for f in files)

    @classmethod
    def of(cls, manifest: Manifest, inodes: Inodes | None = None) -> "Tree":
        return cls(manifest.files, inodes, _created_ns(manifest.created), manifest)

    def lookup(self, parent: int, name: str) -> Node | None:
        node = self.nodes.get(parent)
        if node is None:
            return None
        ino = node.children.get(name)
        return None if ino is None else self.nodes[ino]

    def by_path(self, path: str) -> Node | None:
        node: Node | None = self.nodes[ROOT_INODE]
        for part in path.split("/"):
            node = self.lookup(node.inode, part)
            if node is None:
                return None
        return node

    def stale_entries(self, old: "Tree") -> list[tuple[int, str]]:
        """``(parent inode, name)`` of every entry of *old* that this tree removed or replaced:
        what the kernel's dentry cache must forget after switching from *old* to this tree."""
        out = []
        for node in old.nodes.values():
            for name, ino in node.children.items():
                here = self.nodes.get(node.inode)
                if here is None or here.children.get(name) != ino:
                    out.append((node.inode, name))
        return out

def chunk_slices(entry: FileEntry, offset: int, length: int) -> list[tuple[int, int, int]]:
    """``(chunk index, start within chunk, end within chunk)`` covering a read, clamped at EOF."""
    end = min(offset + length, entry.size)
    if offset >= end:
        return []
    out = []
    i = bisect_right(entry.offsets, offset) - 1
    while offset < end:
        cstart = entry.offsets[i]
        csize = entry.chunk_sizes[i]
        a = offset - cstart
        b = min(end - cstart, csize)
        out.append((i, a, b))
        offset = cstart + b
        i += 1
    return out


def _created_ns(created: str) -> int:
    try:
        return int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return 0
