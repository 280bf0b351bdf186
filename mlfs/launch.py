"""Starting a mount: what ``mlfs mount`` does before its daemon serves (docs/adr/0017, 0021).

This module imports neither pyfuse3 nor trio: the two take ~0.25 s of a start from a cold page
cache, and a root mount no longer waits for them.  Its sequence is:

1. resolve the manifest (:mod:`mlfs.resolve`, in a thread, while this module loads);
2. :func:`prepare`: check the mount point and ``/dev/fuse``, the store, the pinned digest; fetch
   the prefetch set into the cache (:func:`warm`, plain threads); then make the kernel mount itself
   (:func:`kernel_mount`: open ``/dev/fuse``, ``mount(2)``), the way libfuse does for root;
3. :func:`daemonize` forks the daemon and reports ``mounted`` at once.  The daemon imports
   pyfuse3 and trio and serves the ``/dev/fuse`` descriptor it inherited (libfuse takes an open
   one as the mount point ``/dev/fd/N``).  ``--foreground`` does the same without the fork: it
   reports readiness (``--ready-fd``), then imports and serves.

Until the daemon answers the kernel's ``INIT``, requests to the mount wait in the kernel; they are
not refused.  A daemon that fails before it serves removes the kernel mount (:func:`kernel_unmount`)
and says why in its log.  Users other than root and catalog mounts let libfuse mount from the
daemon once it has imported everything (``MLFS_EARLY_MOUNT=0`` does that for root too), and
``mlfs mount`` waits for the daemon's word.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config
from .errors import MlfsError, MountError, StoreUnavailable

log = logging.getLogger("mlfs.launch")

#: Kernel read-ahead for the mount (KiB); best-effort (root only): sequential and mmap reads
#: stream instead of crawling 128 KiB at a time.
READ_AHEAD_KB = 1024
#: Chunks of the prefetch set fetched at once before the mount is reported.  At 16, a test whose
#: store answers through a fault proxy in front of moto, with 1 s timeouts, failed one start in
#: three; at 8, none in six (docs/adr/0021).
WARM_THREADS = 8

# mount(2) flags and umount2(2)'s lazy flag (linux/mount.h).
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


@dataclass
class MountOptions:
    cache_dir: Path
    cache_size: int
    allow_other: bool = False
    prefetch_all: bool = False
    watch: str | None = None  # manifest file to watch for replacement
    switch_warm: bool = False  # a watched manifest's switch: fetch everything before the flip
    switch_check: bool = True  # ... or check the store holds it, flip, fetch (docs/adr/0019)
    catalog_poll: float = config.DEFAULT_CATALOG_POLL
    digest: str | None = None
    memory_bytes: int = field(default_factory=lambda: config.parse_size(config.DEFAULT_MEMORY))
    timeout: float = config.DEFAULT_READ_TIMEOUT
    read_ahead_kb: int = READ_AHEAD_KB
    allow_model_change: bool = False
    on_switch: str | None = None  # shell command run after every switch
    metrics_file: str | None = None  # Prometheus text kept current here
    metrics_interval: float = 5.0
    debug: bool = False
    passthrough: bool = True  # whole copies of files read whole, opened by passthrough (ADR 0035)


def fuse_problem(allow_other: bool) -> str | None:
    """Why a FUSE mount by this user cannot work, if a reason can be seen before trying."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module; in a container: --device /dev/fuse)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return ("no permission to open /dev/fuse (run as root, or give this user read/write "
                "access to it)")
    if os.geteuid() != 0:
        if shutil.which("fusermount3") is None:
            return "fusermount3 is not installed (Debian: apt-get install fuse3)"
        if allow_other and not _user_allow_other():
            return ("--allow-other needs 'user_allow_other' in /etc/fuse.conf when not mounting "
                    "as root")
    return None


def _user_allow_other(path: str = "/etc/fuse.conf") -> bool:
    try:
        with open(path) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point (mlfs umount {mountpoint} first)")


def check_outside(mountpoint: str, **paths: str | os.PathLike | None) -> None:
    """Refuse a cache directory, log file or watched manifest at or under the mount point: the
    mount would hide it, and the daemon would wait on its own mount before it serves
    (``cache_dir=..., log_file=..., manifest=...``)."""
    top = os.path.realpath(mountpoint)
    for name, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            option = "--" + name.replace("_", "-")
            raise MountError(f"{option} {path} is inside the mount point {mountpoint}: "
                             "choose a path outside it")


def prefetch_set(manifest) -> list[tuple[str, int, str]]:
    """Chunks to cache before the mount is ready: prefetch patterns + the first chunk (the header)
    of every file with a tensor table (safetensors, GGUF, PyTorch zip)."""
    from .manifest import match_prefetch

    out: dict[str, tuple[str, int, str]] = {}
    for f in manifest.files:
        if match_prefetch(manifest.prefetch, f.path):
            for cid, size in zip(f.chunk_ids, f.chunk_sizes):
                out[cid] = (cid, size, f.path)
        elif f.tensors is not None and f.chunk_ids:
            out[f.chunk_ids[0]] = (f.chunk_ids[0], f.chunk_sizes[0], f.path)
    return list(out.values())


def fsname_of(manifest) -> str:
    """The mount's source in the mount table: ``mlfs:<id>@<version>``, or ``mlfs:catalog``."""
    return f"mlfs:{manifest.id}@{manifest.version}" if manifest is not None else "mlfs:catalog"


def fuse_options(fsname: str, allow_other: bool, debug: bool = False) -> set[str]:
    """libfuse's options for a mount (pyfuse3's defaults: ``default_permissions``)."""
    options = {"default_permissions", f"fsname={fsname}", "subtype=mlfs", "ro", "nosuid", "nodev"}
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    return options


# -- the early kernel mount ----------------------------------------------------------------------
def early_mount_possible(catalog: bool) -> bool:
    """Whether ``mlfs mount`` makes the kernel mount itself before it serves."""
    return config.EARLY_MOUNT and not catalog and sys.platform == "linux" and os.geteuid() == 0


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def kernel_mount(mountpoint: str, options: set[str]) -> int:
    """Mount a FUSE file system at *mountpoint* (root only) and return its ``/dev/fuse``
    descriptor, for a daemon to serve as ``/dev/fd/N``.  *options* are libfuse's
    (:func:`fuse_options`), turned into ``mount(2)``'s arguments as libfuse turns them for root
    (lib/mount.c): ``fsname`` the source, ``subtype`` the type, ``ro,nosuid,nodev`` flags, and
    the kernel's ``fd=,rootmode=,user_id=,group_id=`` with the permission options."""
    named = dict(o.split("=", 1) for o in options if "=" in o)
    flags = sum(flag for name, flag in (("ro", MS_RDONLY), ("nosuid", MS_NOSUID),
                                         ("nodev", MS_NODEV)) if name in options)
    fstype = f"fuse.{named['subtype']}" if "subtype" in named else "fuse"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot mount {mountpoint}: cannot open /dev/fuse: {e.strerror}") from None
    try:
        mode = os.stat(mountpoint).st_mode
        data = ",".join([*sorted(options & {"default_permissions", "allow_other"}), f"fd={fd}",
                         f"rootmode={mode & 0o170000:o}", f"user_id={os.getuid()}",
                         f"group_id={os.getgid()}"])
        if _libc().mount(os.fsencode(named.get("fsname", fstype)), os.fsencode(mountpoint),
                         fstype.encode(), ctypes.c_ulong(flags), data.encode()) != 0:
            err = ctypes.get_errno()
            raise MountError(f"cannot mount {mountpoint}: {os.strerror(err)}")
    except OSError as e:
        os.close(fd)
        raise MountError(f"cannot mount {mountpoint}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def kernel_unmount(mountpoint: str, fd: int | None) -> None:
    """Detach a mount made by :func:`kernel_mount`, unless it is gone already: the kernel marks
    the descriptor of an unmounted (or aborted) connection with POLLERR, as libfuse checks
    before it unmounts (lib/mount.c: ``fuse_kern_unmount``)."""
    if fd is not None:
        try:
            p = select.poll()
            p.register(fd, 0)
            if any(ev & select.POLLERR for _, ev in p.poll(0)):
                return
        except (OSError, ValueError):
            pass
    if _libc().umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more); no path
            log.warning("cannot unmount %s: %s", mountpoint, os.strerror(err))


class KernelMount:
    """A kernel mount made by :func:`kernel_mount`, and its ``/dev/fuse`` descriptor."""

    def __init__(self, mountpoint: str, fd: int) -> None:
        self.mountpoint = mountpoint
        self.fd = fd
        self.mounted = True
        #: Chunks and bytes fetched for it before the daemon started (its stats count them).
        self.fetched = (0, 0)

    @property
    def device_path(self) -> str:
        """What libfuse takes as the mount point to serve this descriptor."""
        return f"/dev/fd/{self.fd}"

    def unmount(self) -> None:
        """Take the mount down (once; later calls do nothing).  Before the descriptor is closed."""
        if self.mounted:
            self.mounted = False
            kernel_unmount(self.mountpoint, self.fd)


class EarlySignals:
    """SIGTERM and SIGHUP before trio's handler is in place (an early mount is up while the
    daemon still imports): until :attr:`unwind` is cleared they unwind the start — the kernel
    mount is taken down on the way out, and the exit status is 0, as for a signal once serving;
    after that they are kept in :attr:`caught` for the mount's signal task to act on.

    :func:`prepare` blocks both signals before it mounts, so that none can end the process
    between ``mount(2)`` and the code that unmounts (the fork included); creating this object
    installs the handlers, then unblocks them: one that came meanwhile is acted on now.  Create
    it inside the ``try`` whose ``finally`` unmounts."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.unwind = True
        self.caught: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def __call__(self, signum, frame) -> None:
        if self.unwind:
            log.info("signal %s while starting: unmounting", signum)
            raise SystemExit(0)
        self.caught = signum


def warm(store, cache, chunks: list[tuple[str, int, str]], timeout: float,
         threads: int = WARM_THREADS) -> tuple[int, int]:
    """Fetch the ``(chunk id, size, file path)`` chunks the cache lacks, verified, into the cache;
    return how many chunks and bytes that took, or raise the first failure, naming the file.
    Plain threads: no trio in ``mlfs mount``'s own process.  Each worker closes its cache
    connection when done (the process forks next)."""
    todo = [c for c in chunks if not cache.contains(c[0])]
    if not todo:
        return 0, 0
    if store is None:
        raise MountError(f"cannot fetch {todo[0][2]}: it is not cached and no store is configured")
    errors: list[MlfsError] = []
    lock = threading.Lock()
    deadline = max(1.0, timeout - 12)
    fetched = [0, 0]

    def worker() -> None:
        try:
            while not errors:
                with lock:
                    if not todo:
                        return
                    cid, size, path = todo.pop()
                try:
                    data = store.get_chunk_verified(cid, size, deadline=deadline)
                except Exception as e:  # noqa: BLE001 - the mount command reports it in one line
                    why = e if isinstance(e, MlfsError) else f"{type(e).__name__}: {e}"
                    errors.append(MlfsError(f"cannot fetch {path} (chunk {cid[:16]}): {why}"))
                    return
                cache.put(cid, data)
                with lock:
                    fetched[0] += 1
                    fetched[1] += len(data)
        finally:
            cache.close()

    pool = [threading.Thread(target=worker, name="mlfs-warm", daemon=True)
            for _ in range(min(threads, len(todo)))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return fetched[0], fetched[1]


def check_before_mount(manifest, store, mountpoint: str, opts: MountOptions) -> str | None:
    """The checks before a kernel mount, whoever makes it: the mount point, ``/dev/fuse``, the
    pinned digest, the store.  Returns a warning when the store is down for now (the mount then
    serves from the cache until it answers); raises MlfsError for what stops the mount (a
    missing bucket or directory, refused access: a clear error now, not EIO later)."""
    check_mountpoint(mountpoint)
    problem = fuse_problem(opts.allow_other)
    if problem:
        raise MountError(f"cannot mount {mountpoint}: {problem}")
    if manifest is not None and opts.digest and manifest.digest != opts.digest:
        raise MountError(f"{manifest.ref} has digest {manifest.digest}, not the pinned {opts.digest}")
    if store is not None:
        try:
            store.check_once()
        except StoreUnavailable as e:
            return f"{e}; serving from the cache until it answers"
    return None


def prepare(manifest, store, mountpoint: str, opts: MountOptions) -> tuple[KernelMount, str | None]:
    """Everything before the daemon, for an early mount: checks, the prefetch set cached, the
    kernel mount made.  Returns the mount and a warning (store down, serving from the cache) or
    None, with SIGTERM and SIGHUP blocked (:class:`EarlySignals` takes them over).  Raises
    MlfsError for anything that stops the mount."""
    from .cache import ChunkCache

    mountpoint = os.path.abspath(mountpoint)
    warning = check_before_mount(manifest, store, mountpoint, opts)
    cache = ChunkCache(opts.cache_dir, opts.cache_size)
    try:
        fetched = warm(store, cache, prefetch_set(manifest), opts.timeout)
    finally:
        cache.close()
    options = fuse_options(fsname_of(manifest), opts.allow_other)
    signal.pthread_sigmask(signal.SIG_BLOCK, EarlySignals.SIGNALS)
    try:
        kmount = KernelMount(mountpoint, kernel_mount(mountpoint, options))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, EarlySignals.SIGNALS)
        raise
    kmount.fetched = fetched
    return kmount, warning


# -- daemon mode ---------------------------------------------------------------------------------
def daemonize(run, log_file: Path, timeout: float = 300, wait: bool = True) -> tuple[int, str | None]:
    """Fork a daemon that calls ``run(ready_fd)``; return its pid and warning once it is ready.

    The child starts a session of its own, writes its output to *log_file*, and reports on the
    pipe ``ready``, ``ready: <warning>`` or ``error: <message>``; the parent raises MountError for
    an error or a child that exits without a word.  With ``wait=False`` (an early mount: the
    kernel mount is up already) the parent returns at once and the child gets ``None``.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        ready_fd = w if wait else None
        try:
            os.close(r)
            os.setsid()
            out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            if ready_fd is None:
                os.close(w)
            run(ready_fd)
            code = 0
        except SystemExit as e:  # a signal while starting (EarlySignals), or sys.exit
            code = 0 if e.code in (None, 0) else 1
        except BaseException as e:  # noqa: BLE001 - reported on the pipe, then exit
            if ready_fd is not None:
                try:
                    os.write(ready_fd, f"error: {e}".encode())
                except OSError:
                    pass
            if not isinstance(e, MlfsError):
                import traceback

                traceback.print_exc()
            else:
                print(f"mlfs: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    os.close(w)
    if not wait:
        os.close(r)
        return pid, None
    msg = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as pipe:
        while time.monotonic() < deadline:
            chunk = pipe.read(4096)
            if not chunk:
                break
            msg += chunk
    text = msg.decode(errors="replace").strip()
    if text == "ready":
        return pid, None
    if text.startswith("ready: "):
        return pid, text.removeprefix("ready: ")
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    raise MountError(text.removeprefix("error: ") or f"mount process exited; see {log_file}")
