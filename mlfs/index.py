"""The index document of a store: every version and alias, with metadata, in one small file.

Stores that can list (a directory, S3) do not need it to work; a store read over plain HTTP (a
static site, a CDN, ``mlfs serve``) cannot list, so ``ls``, catalog mounts and aliases read this
document instead.  It is derived data: ``generate``, ``rm`` and ``alias set`` rebuild it from the
store's listing after each change (:func:`mlfs.catalog.rebuild_index`), and ``mlfs index STORE``
rebuilds it by hand.  Format ``mlfs.index/1``::

    {"format": "mlfs.index/1", "updated": "2026-11-23T01:02:03Z",
     "versions": [{"id": "minilm", "version": "v2", "created": "...", "digest": "blake3:...",
                   "metadata": {...}, "logical_bytes": 91000000, "files": 13, "mtime": 1.7e9}],
     "aliases": [{"id": "minilm", "alias": "stable", "version": "v2"}]}

Read over HTTP it is untrusted: :func:`loads` validates names, types and sizes; a manifest it
points at is still validated and digest-checked when it is read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ManifestError
from .manifest import check_name

FORMAT = "mlfs.index/1"
MAX_ENTRIES = 1_000_000


@dataclass
class Index:
    versions: list[dict[str, Any]] = field(default_factory=list)
    aliases: list[dict[str, str]] = field(default_factory=list)
    updated: str = ""

    def dumps(self) -> bytes:
        doc = {"format": FORMAT,
               "updated": self.updated or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "versions": sorted(self.versions, key=lambda v: (v["id"], v["version"])),
               "aliases": sorted(self.aliases, key=lambda a: (a["id"], a["alias"]))}
        return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()

    def same_as(self, other: "Index") -> bool:
        return (sorted(json.dumps(v, sort_keys=True) for v in self.versions)
                == sorted(json.dumps(v, sort_keys=True) for v in other.versions)
                and sorted(json.dumps(a, sort_keys=True) for a in self.aliases)
                == sorted(json.dumps(a, sort_keys=True) for a in other.aliases))


def loads(data: bytes) -> Index:
    """Parse and validate an index document (untrusted).  Raises ManifestError."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"the store's index.json is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"the store's index.json is not an {FORMAT} document")
    versions, aliases = doc.get("versions"), doc.get("aliases")
    if not isinstance(versions, list) or not isinstance(aliases, list) \
            or len(versions) + len(aliases) > MAX_ENTRIES:
        raise ManifestError("the store's index.json has no valid version and alias lists")
    out = Index(updated=str(doc.get("updated", ""))[:64])
    for v in versions:
        if not isinstance(v, dict):
            raise ManifestError("the store's index.json lists a version that is not an object")
        check_name("model id", v.get("id"))
        check_name("version", v.get("version"))
        meta = v.get("metadata")
        mtime = v.get("mtime", 0)
        if not isinstance(meta, dict) or type(mtime) not in (int, float):
            raise ManifestError(f"the store's index.json has a malformed entry for "
                                f"{v.get('id')}@{v.get('version')}")
        for key in ("logical_bytes", "files"):
            if type(v.get(key, 0)) is not int or v.get(key, 0) < 0:
                raise ManifestError(f"the store's index.json has a bad {key} for "
                                    f"{v['id']}@{v['version']}")
        for key in ("created", "digest"):
            if not isinstance(v.get(key, ""), str):
                raise ManifestError(f"the store's index.json has a bad {key} for "
                                    f"{v['id']}@{v['version']}")
        out.versions.append(v)
    for a in aliases:
        if not isinstance(a, dict):
            raise ManifestError("the store's index.json lists an alias that is not an object")
        check_name("model id", a.get("id"))
        check_name("alias", a.get("alias"))
        check_name("version", a.get("version"))
        out.aliases.append({"id": a["id"], "alias": a["alias"], "version": a["version"]})
    return out
