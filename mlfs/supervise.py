"""Background tasks of a mount that can fail without ending it.

A mount runs a few long-lived tasks beside the FUSE loop (the control socket, the manifest watch,
the catalog poll, ``--prefetch all``) and many short ones (read-ahead fetches).  In trio an exception
that leaves a task cancels its nursery — for a mount that means unmounting under its readers.  So
every background task runs under :class:`Supervisor`: an exception is logged (one line for an
``MlfsError``, a traceback for anything else: that is a bug), counted in ``mlfs stats``
(``background_errors``, ``last_background_error``), and the task is restarted after a backoff or
abandoned.  Only cancellation (unmount, signals) passes through.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from . import config
from .errors import MlfsError

log = logging.getLogger("mlfs.supervise")


class Supervisor:
    def __init__(self) -> None:
        self.errors = 0
        self.last_error: str | None = None
        self.nursery: trio.Nursery | None = None

    def record(self, name: str, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{name}: {exc}" if isinstance(exc, MlfsError) else \
            f"{name}: {type(exc).__name__}: {exc}"
        if isinstance(exc, MlfsError):
            log.error("%s failed: %s", name, exc)
        else:
            log.error("%s failed unexpectedly", name, exc_info=exc)

    async def run(self, name: str, fn: Callable[[], Awaitable[None]], *, restart: bool = True,
                  delay: float = config.RESTART_DELAY) -> None:
        """Run ``fn()``; on an exception record it, then restart it (with a doubling delay) or, if
        ``restart`` is false, give up.  Returns when ``fn`` returns."""
        while True:
            try:
                await fn()
                return
            except Exception as e:  # noqa: BLE001 - the point: nothing here may end the mount
                self.record(name, e)
                if not restart:
                    return
                log.info("restarting %s in %.1fs", name, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, config.RESTART_DELAY_MAX)

    def start(self, name: str, fn: Callable[[], Awaitable[None]], *, restart: bool = False) -> None:
        """Start a supervised task in the mount's nursery (no-op before the nursery exists)."""
        if self.nursery is not None:
            self.nursery.start_soon(lambda: self.run(name, fn, restart=restart))

    def snapshot(self) -> dict:
        return {"background_errors": self.errors, "last_background_error": self.last_error}
