"""The one exception hierarchy of mlfs.

Every error a user can cause or meet (bad input, an unreachable store, a damaged chunk) is an
``MlfsError``.  Each knows the errno it becomes at the FUSE boundary and reads as one line, so the CLI
can print ``str(e)`` and exit non-zero without a traceback.  Errors also inherit from the closest
builtin (``FileNotFoundError``, ``ValueError``...) so library users can catch what they expect.
"""

from __future__ import annotations

import errno as _errno


class MlfsError(Exception):
    """Base of all mlfs errors; ``str(e)`` is a complete one-line message."""

    errno: int = _errno.EIO


class ManifestError(MlfsError, ValueError):
    """A manifest is malformed, inconsistent or unsafe (it is untrusted input)."""

    errno = _errno.EINVAL


class StoreError(MlfsError, OSError):
    """A store operation failed."""

    errno = _errno.EIO

    def __str__(self) -> str:  # OSError's str() would prefix "[Errno ...]"
        return self.args[0] if self.args else self.__class__.__name__


class StoreNotFound(StoreError, FileNotFoundError):
    """The store itself does not exist (missing directory or bucket)."""

    errno = _errno.ENOENT


class ObjectNotFound(StoreError, FileNotFoundError):
    """A chunk or manifest is missing from the store."""

    errno = _errno.ENOENT


class StoreUnavailable(StoreError):
    """The store could not be reached or kept failing until the retry deadline ran out."""

    errno = _errno.EIO


class StorePermissionError(StoreError, PermissionError):
    """The store refused access (credentials, policy); never retried."""

    errno = _errno.EACCES


class CorruptChunk(StoreError):
    """A chunk's bytes do not hash to its id: it is never served."""

    errno = _errno.EIO


class UsageError(MlfsError, ValueError):
    """Bad arguments (an unparsable size, a malformed reference...)."""

    errno = _errno.EINVAL


class GenerateError(MlfsError):
    """``generate`` could not read the model directory."""

    errno = _errno.EIO


class VersionExists(StoreError, FileExistsError):
    """A version is already published with other content (published versions are immutable)."""

    errno = _errno.EEXIST


class CacheError(MlfsError):
    """The chunk cache directory cannot be created, written or opened."""

    errno = _errno.EIO


class MountError(MlfsError):
    """A mount could not be set up."""

    errno = _errno.EIO
