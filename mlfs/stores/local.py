"""The local-directory store: the embedded default and the reference implementation."""

from __future__ import annotations

import ctypes
import os
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import ObjectNotFound, StoreError, StoreNotFound, StorePermissionError
from .base import ObjectInfo, Store

_libc = ctypes.CDLL(None, use_errno=True)


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from None

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreNotFound(f"store directory {self.root} does not exist")

    def _path(self, key: str) -> Path:
        return self.root / key

    def _get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.url}") from None
        except PermissionError as e:
            raise StorePermissionError(f"cannot read {self._path(key)}: {e.strerror}") from None

    def _put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._error(path, e) from None

    def _create(self, key: str, data: bytes) -> bool:
        """link(2) of a complete temp file: atomic, and fails if the name exists (EEXIST), so of
        two concurrent creators exactly one wins, whatever their timing."""
        path = self._path(key)
        tmp = self._write_temp(path, data, durable=True)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise self._error(path, e) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _write_temp(self, path: Path, data: bytes | memoryview, durable: bool = False) -> Path:
        """*data* in a temp file beside *path*, unique per writer: concurrent writers never share
        a file, and a crash leaves only a stray temp file, never a partial object under a name."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._error(path, e) from None
        return tmp

    @staticmethod
    def _error(path: Path, e: OSError) -> StoreError:
        if isinstance(e, PermissionError):
            return StorePermissionError(f"cannot write {path}: {e.strerror}")
        return StoreError(f"cannot write {path}: {e.strerror}")

    def _head(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot stat {self._path(key)}: {e.strerror}") from None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/"))
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue  # temp files of writers in progress
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(os.path.relpath(full, self.root), st.st_size, st.st_mtime)

    def _touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.url}") from None

    def _delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """syncfs(2) on the store's file system: one call makes every chunk written durable."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StoreError(f"cannot sync store {self.root}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def put_manifest_bytes(self, model_id: str, version: str, data: bytes) -> None:
        super().put_manifest_bytes(model_id, version, data)
        self.sync()

    def create_manifest(self, model_id: str, version: str, data: bytes) -> bool:
        created = super().create_manifest(model_id, version, data)
        self.sync()
        return created
