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


class Tree:
    """Inode table of one manifest version.  Inode numbers are assigned in path order."""

    def __init__(self, manifest: Manifest, first_inode: int = ROOT_INODE + 1) -> None:
        self.manifest = manifest
        self.mtime_ns = _created_ns(manifest.created)
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE, stat.S_IFDIR | 0o555)}
        next_inode = first_inode
        for f in sorted(manifest.files, key=lambda f: f.path):
            parent = self.nodes[ROOT_INODE]
            parts = f.path.split("/")
            for part in parts[:-1]:
                ino = parent.children.get(part)
                if ino is None:
                    ino = next_inode
                    next_inode += 1
                    self.nodes[ino] = Node(ino, part, parent.inode, stat.S_IFDIR | 0o555)
                    parent.children[part] = ino
                parent = self.nodes[ino]
            ino = next_inode
            next_inode += 1
            self.nodes[ino] = Node(ino, parts[-1], parent.inode, stat.S_IFREG | f.mode, f.size, f)
            parent.children[parts[-1]] = ino
        for node in self.nodes.values():
            node.names = sorted(node.children)
        self.next_inode = next_inode

    def lookup(self, parent: int, name: str) -> Node | None:
        node = self.nodes.get(parent)
        if node is None:
            return None
        ino = node.children.get(name)
        return None if ino is None else self.nodes[ino]

    def by_path(self, path: str) -> Node | None:
        node = self.nodes[ROOT_INODE]
        for part in path.split("/"):
            nxt = self.lookup(node.inode, part)
            if nxt is None:
                return None
            node = nxt
        return node


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
