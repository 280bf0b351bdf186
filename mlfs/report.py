"""``inspect`` and ``diff``: what a manifest holds and what changes between two (pure)."""

from __future__ import annotations

from typing import Any

from .manifest import Manifest


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def inspect(m: Manifest) -> dict[str, Any]:
    chunks = m.chunk_sizes()
    return {
        "id": m.id, "version": m.version, "digest": m.digest, "created": m.created,
        "metadata": m.metadata, "prefetch": m.prefetch,
        "logical_bytes": m.logical_size,
        "unique_chunks": len(chunks), "unique_chunk_bytes": sum(chunks.values()),
        "files": [{"path": f.path, "size": f.size, "mode": oct(f.mode), "blake3": f.blake3,
                   "chunks": len(f.chunk_ids),
                   "tensors": None if f.tensors is None else len(f.tensors)} for f in m.files],
        "tensors": {f.path: {name: {"begin": b, "end": e, "size": e - b, "hash": h}
                             for name, (b, e, h) in f.tensors.items()}
                    for f in m.files if f.tensors},
    }


def render_inspect(info: dict[str, Any], show_tensors: bool = False) -> str:
    lines = [f"{info['id']}@{info['version']}  {info['digest']}",
             f"created {info['created']}  library {info['metadata'].get('library') or '-'}",
             f"{len(info['files'])} files, {human(info['logical_bytes'])} "
             f"({info['logical_bytes']} bytes), {info['unique_chunks']} unique chunks "
             f"({human(info['unique_chunk_bytes'])})", ""]
    width = max((len(f["path"]) for f in info["files"]), default=4)
    lines.append(f"{'path':<{width}}  {'size':>12}  {'chunks':>6}  {'tensors':>7}  mode")
    for f in info["files"]:
        t = "-" if f["tensors"] is None else str(f["tensors"])
        lines.append(f"{f['path']:<{width}}  {f['size']:>12}  {f['chunks']:>6}  {t:>7}  {f['mode']}")
    if show_tensors:
        for path, tensors in info["tensors"].items():
            lines += ["", f"{path}:"]
            for name, t in tensors.items():
                lines.append(f"  {name}  [{t['begin']}, {t['end']})  {t['size']} bytes")
    return "\n".join(lines)


def diff(a: Manifest, b: Manifest) -> dict[str, Any]:
    """Files and tensors that differ, and the bytes a host holding *a* must fetch to get *b*."""
    fa = {f.path: f for f in a.files}
    fb = {f.path: f for f in b.files}
    have = a.chunk_sizes()
    need = {c: s for c, s in b.chunk_sizes().items() if c not in have}
    changed, tensors = [], {}
    for path in sorted(fa.keys() & fb.keys()):
        x, y = fa[path], fb[path]
        if x.blake3 != y.blake3 or x.size != y.size:
            changed.append(path)
        if x.tensors is not None or y.tensors is not None:
            tx, ty = x.tensors or {}, y.tensors or {}
            t = {"added": sorted(ty.keys() - tx.keys()), "removed": sorted(tx.keys() - ty.keys()),
                 "changed": sorted(n for n in tx.keys() & ty.keys()
                                   if tx[n][2] != ty[n][2] or tx[n][1] - tx[n][0] != ty[n][1] - ty[n][0])}
            t["unchanged"] = len(tx.keys() & ty.keys()) - len(t["changed"])
            if t["added"] or t["removed"] or t["changed"]:
                tensors[path] = t
    return {
        "from": a.ref, "to": b.ref,
        "files": {"added": sorted(fb.keys() - fa.keys()), "removed": sorted(fa.keys() - fb.keys()),
                  "changed": changed,
                  "unchanged": len(fa.keys() & fb.keys()) - len(changed)},
        "tensors": tensors,
        "fetch_bytes": sum(need.values()), "fetch_chunks": len(need),
        "logical_bytes": b.logical_size,
    }


def render_diff(d: dict[str, Any]) -> str:
    lines = [f"{d['from']} -> {d['to']}"]
    for kind in ("added", "removed", "changed"):
        for p in d["files"][kind]:
            lines.append(f"  {kind:<8} {p}")
    lines.append(f"  {d['files']['unchanged']} files unchanged")
    for path, t in d["tensors"].items():
        lines.append(f"{path}: {len(t['changed'])} tensors changed, {len(t['added'])} added, "
                     f"{len(t['removed'])} removed, {t['unchanged']} unchanged")
        for kind in ("added", "removed", "changed"):
            for n in t[kind]:
                lines.append(f"  {kind:<8} {n}")
    share = d["fetch_bytes"] / d["logical_bytes"] if d["logical_bytes"] else 0.0
    lines.append(f"to get {d['to']}, a host holding {d['from']} fetches {d['fetch_chunks']} chunks, "
                 f"{human(d['fetch_bytes'])} ({d['fetch_bytes']} bytes, {share:.1%} of "
                 f"{human(d['logical_bytes'])})")
    return "\n".join(lines)
