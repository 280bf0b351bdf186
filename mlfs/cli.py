"""The ``mlfs`` command: a thin click layer over the library.

Each command opens library objects, calls them and prints.  Every ``MlfsError`` (and any other
failure) becomes one line on stderr and a non-zero exit; ``MLFS_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import config
from .errors import MlfsError

STORE_OPT = click.option("--store", "store_url", envvar="MLFS_STORE", metavar="STORE",
                         help="Store URL: a path, file:///abs/path or s3://bucket/prefix "
                              "[env MLFS_STORE].")
ENDPOINT_OPT = click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", metavar="URL",
                            help="S3 endpoint [env AWS_ENDPOINT_URL].")


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a reader gone away shows here, not in the interpreter's exit
            return result
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MlfsError as e:
            _fail(str(e), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError as e:
            if _stdout_gone():  # `mlfs stats | head`: the reader left; say nothing, as cat does
                sys.exit(141)
            _fail(f"unexpected {type(e).__name__}: {e} (MLFS_DEBUG=1 shows the traceback)", 1)
        except Exception as e:  # noqa: BLE001 - the promise is: no traceback, a clear line
            if config.DEBUG:
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (MLFS_DEBUG=1 shows the traceback)", 1)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone away (poll says POLLERR); if so,
    stdout now points to /dev/null so that the interpreter's last flush does not fail again."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def _setup_logging(debug: bool, filename: str | None) -> None:
    """Logging of the long-running commands (mount, serve)."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, filename=filename,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # botocore's debug log prints request headers (the access key id, signatures): never log it.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str, code: int) -> None:
    click.echo(f"mlfs: error: {msg.splitlines()[0] if msg else 'failed'}", err=True)
    sys.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlfs")
def main() -> None:
    """Ship deduplicated ML models as a lazy, verified, read-only FUSE filesystem."""


def _progress(total: int, label: str):
    """A click progress bar on a terminal, nothing otherwise; returns (context, callback)."""
    import contextlib
    import threading

    if not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False)
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            bar.update(n)
    return bar, update


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@STORE_OPT
@ENDPOINT_OPT
@click.option("--id", "model_id", required=True, help="Model id, e.g. minilm.")
@click.option("--version", "version", required=True, help="Version name, e.g. v2.")
@click.option("--prefetch", help="Comma-separated files/globs cached before a mount is ready "
                                 "(default: every small non-weights file).")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE",
              help="library, framework, description, tags (comma-separated), derived_from, or any "
                   "other key. Repeatable.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the manifest here "
              "('-' for stdout; default: stdout when not a terminal).")
@click.option("--threads", default=config.DEFAULT_THREADS, show_default=True,
              type=click.IntRange(1, config.MAX_THREADS), help="Hashing/upload threads.")
@click.option("--force", is_flag=True, help="Replace ID@VERSION if it is already published with "
              "other content (published versions are otherwise immutable).")
@click.option("--compress/--no-compress", default=True, show_default=True,
              help="Store a chunk compressed (byte-grouped zstd) where that makes it at least "
                   "1/16 smaller; readers need mlfs 0.2 or later.")
def generate(model_dir, store_url, endpoint_url, model_id, version, prefetch, metadata, output,
             threads, force, compress):
    """Store MODEL_DIR as deduplicated chunks and publish its manifest ID@VERSION.

    Publishing the same content again is a no-op; other content under a published ID@VERSION is
    refused unless --force."""
    from .generate import generate as run, scan_model_dir
    from .report import human
    from .stores import open_store
    from pathlib import Path

    meta = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--metadata")
        meta[key] = value
    if not store_url:
        raise click.UsageError("--store is required (or set MLFS_STORE)")
    store = open_store(store_url, endpoint_url=endpoint_url, create=True)
    total = sum(e[2] for e in scan_model_dir(Path(model_dir)))
    bar, update = _progress(total, f"{model_id}@{version}")
    with bar:
        res = run(model_dir, store, model_id, version,
                  prefetch=[p.strip() for p in prefetch.split(",") if p.strip()] if prefetch else None,
                  metadata=meta, progress=update, threads=threads, force=force, compress=compress)
    for w in res.warnings:
        click.echo(f"mlfs: warning: {w}", err=True)
    data = res.manifest.dumps()
    if output and output != "-":
        write_output(output, data)
    elif output == "-" or not sys.stdout.isatty():
        sys.stdout.buffer.write(data)
    share = res.dedup_bytes / res.logical_bytes if res.logical_bytes else 0.0
    what = {"unchanged": "already published with this content (nothing changed)",
            "replaced": "replaced the published version (--force)"}.get(res.outcome, res.outcome)
    click.echo(f"{res.manifest.ref}: {res.files} files, {human(res.logical_bytes)} logical, "
               f"{res.unique_chunks} chunks; uploaded {res.new_chunks} new chunks "
               f"({human(res.new_bytes)}{_stored(res)}); "
               f"deduplicated {human(res.dedup_bytes)} ({share:.1%}); "
               f"{what}; digest {res.manifest.digest}", err=True)


def _stored(res) -> str:
    """What the new chunks take in the store, where compression made that less."""
    from .report import human

    if res.stored_bytes >= res.new_bytes:
        return ""
    return f", {human(res.stored_bytes)} stored"


def write_output(path: str, data: bytes) -> None:
    """Write *data* to *path*: a new or regular file is replaced atomically (temp file + rename);
    anything else (``/dev/null``, a FIFO, a terminal) is written as it is, never replaced."""
    import stat as stat_

    path = os.path.realpath(path)  # through a symlink to what it names; the link stays
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None
    try:
        if st is not None and not stat_.S_ISREG(st.st_mode):
            with open(path, "wb") as f:
                f.write(data)
            return
        from .client import write_atomic

        write_atomic(path, data, stat_.S_IMODE(st.st_mode) if st is not None else None)
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None


def _chunk_cache_opts(f):
    """--cache-dir, --cache-size and --memory of the commands that read chunks (mount, serve)."""
    f = click.option("--memory", default=config.DEFAULT_MEMORY, show_default=True,
                     help="In-memory chunk buffer budget (plus as much again for data in "
                          "flight).")(f)
    f = click.option("--cache-size", default=config.DEFAULT_CACHE_SIZE, show_default=True,
                     help="Disk cache budget, e.g. 20G.")(f)
    return click.option("--cache-dir", type=click.Path(file_okay=False),
                        help="Chunk cache shared by every mount and server on this host "
                             "[default: $MLFS_CACHE_DIR or $XDG_CACHE_HOME/mlfs].")(f)


def _manifest_args(f):
    f = click.option("--version", "version", help="Version (with --id and --store).")(f)
    f = click.option("--id", "model_id", help="Model id (with --version and --store).")(f)
    f = ENDPOINT_OPT(f)
    return STORE_OPT(f)


@main.command()
@click.argument("manifest", required=False)
@_manifest_args
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tensors", is_flag=True, help="List every tensor with its byte range.")
def inspect(manifest, store_url, endpoint_url, model_id, version, as_json, tensors):
    """Show a manifest's files, sizes, tensors and chunk counts.

    MANIFEST is a file, or ID@VERSION with --store."""
    from .report import inspect as run, render_inspect
    from .resolve import resolve

    m, _ = resolve(manifest, None if manifest and os.path.exists(manifest) else store_url,
                   model_id=model_id, version=version, endpoint_url=endpoint_url)
    info = run(m)
    click.echo(json.dumps(info, indent=1) if as_json else render_inspect(info, tensors))


@main.command()
@click.argument("manifest_a")
@click.argument("manifest_b")
@STORE_OPT
@ENDPOINT_OPT
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(manifest_a, manifest_b, store_url, endpoint_url, as_json):
    """Files and tensors that differ between two versions, and the bytes to fetch from A to B."""
    from .report import diff as run, render_diff
    from .resolve import resolve

    a, _ = resolve(manifest_a, store_url, endpoint_url=endpoint_url)
    b, _ = resolve(manifest_b, store_url, endpoint_url=endpoint_url)
    d = run(a, b)
    click.echo(json.dumps(d, indent=1) if as_json else render_diff(d))


@main.command()
# One or two: click fills optional positionals first, so with [MANIFEST] DEST_DIR declared as two
# arguments ``export --id X --version V DEST`` would take DEST for the manifest.
@click.argument("paths", nargs=-1, required=True, metavar="[MANIFEST] DEST_DIR")
@_manifest_args
@click.option("--force", is_flag=True, help="Write into a non-empty DEST_DIR, replacing files.")
def export(paths, store_url, endpoint_url, model_id, version, force):
    """Rebuild a manifest's files byte-exact into DEST_DIR (no FUSE needed).

    MANIFEST is a file, or ID@VERSION with --store; leave it out to name the version with --id
    and --version.  The files are built and verified beside DEST_DIR and moved in only when all
    are complete: a failure leaves DEST_DIR as it was."""
    from .export import export as run
    from .report import human
    from .resolve import resolve

    if len(paths) > 2:
        raise click.UsageError("export takes [MANIFEST] DEST_DIR: at most two arguments")
    manifest, dest_dir = (None, paths[0]) if len(paths) == 1 else paths
    m, store = resolve(manifest, store_url, model_id=model_id, version=version,
                       endpoint_url=endpoint_url)
    if store is None:
        raise click.UsageError("the manifest names no store: pass --store")
    from .buffers import reuse_freed_memory

    reuse_freed_memory()  # decoded chunks: 4 MiB buffers again and again (docs/adr/0031)
    bar, update = _progress(m.logical_size, f"export {m.ref}")
    with bar:
        n = run(m, store, dest_dir, progress=update, force=force)
    click.echo(f"{m.ref}: {len(m.files)} files, {human(n)} written to {dest_dir}, all verified",
               err=True)


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--manifest", "manifest_src", metavar="MANIFEST",
              help="Manifest file, or ID@VERSION with --store.")
@_manifest_args
@_chunk_cache_opts
@click.option("--prefetch", type=click.Choice(["manifest", "all"]), default="manifest",
              show_default=True, help="'all' warms the whole model in the background.")
@click.option("--timeout", default=config.DEFAULT_READ_TIMEOUT, show_default=True,
              type=click.FloatRange(min=1.0),
              help="Seconds after which a read of an unobtainable chunk fails with EIO.")
@click.option("--read-ahead", default=config.DEFAULT_READ_AHEAD, show_default=True,
              help="Kernel read-ahead of the mount (larger streams faster, smaller stays lazier).")
@click.option("--warm", "warm_switch", is_flag=True,
              help="On a switch of the watched manifest, fetch every chunk the new version lacks "
              "before the flip (default: check that the store holds them, flip, fetch them in the "
              "background).")
@click.option("--no-warm", is_flag=True, help="On a switch, flip at once, without checking the "
              "store; fetch in the background.")
@click.option("--digest", help="Serve (and switch to) only a manifest with this digest.")
@click.option("--poll", default=config.DEFAULT_CATALOG_POLL, show_default=True,
              type=click.FloatRange(min=0.1),
              help="Catalog mounts (--store alone): seconds between looks for new versions/aliases.")
@click.option("--allow-model-change", is_flag=True, help="Let a replaced --manifest file switch "
              "the mount to another model id (default: refused).")
@click.option("--on-switch", "on_switch", metavar="CMD", help="Run CMD (with sh) after every "
              "switch: MLFS_SWITCH_FROM, MLFS_SWITCH_TO, MLFS_SWITCH_CHANGES and MLFS_MOUNTPOINT "
              "in its environment; its exit status is logged and counted.")
@click.option("--metrics-file", type=click.Path(dir_okay=False), help="Keep Prometheus text of "
              "the mount's stats in this file (node-exporter's textfile collector), every 5 s.")
@click.option("--allow-other", is_flag=True, help="Let other users (containers) see the mount.")
@click.option("--passthrough/--no-passthrough", default=True, show_default=True,
              help="Keep a whole copy of each large file read whole (within --cache-size) and let "
              "the kernel serve later opens from it, at local-disk speed (root, Linux >= 6.9).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Daemon log [default: in the cache dir].")
@click.option("--debug", is_flag=True, help="Verbose logging.")
@click.option("--ready-fd", type=int, hidden=True)
def mount(mountpoint, manifest_src, store_url, endpoint_url, model_id, version, cache_dir,
          cache_size, memory, prefetch, timeout, read_ahead, warm_switch, no_warm, digest, poll,
          allow_model_change, on_switch, metrics_file, allow_other, passthrough, foreground,
          log_file, debug, ready_fd):
    """Mount a model version read-only at MOUNTPOINT.

    \b
      mlfs mount --manifest minilm-v1.json /mnt/model      (switches when the file is replaced)
      mlfs mount --store s3://models --id minilm --version v1 /mnt/model
      mlfs mount --store s3://models /mnt/models           (catalog: <id>/<version|alias>/...)
    """
    from pathlib import Path

    cache = Path(cache_dir) if cache_dir else config.default_cache_dir()
    catalog = not (manifest_src or model_id or version)
    if catalog and not store_url:
        raise click.UsageError("give --manifest, --store with --id/--version, or --store alone")
    if warm_switch and no_warm:
        raise click.UsageError("--warm and --no-warm exclude each other")

    def find() -> tuple:
        if catalog:
            from .stores import open_store

            return None, open_store(store_url, endpoint_url=endpoint_url)
        from .resolve import resolve

        return resolve(manifest_src, store_url, model_id=model_id, version=version,
                       endpoint_url=endpoint_url)
    # The manifest is fetched while the rest of the start is imported (docs/adr/0019).
    finding = _Background(find)
    from . import launch
    early = launch.early_mount_possible(catalog)
    if not early:  # the daemon mounts once pyfuse3 and trio are in: import them meanwhile
        from .mount import serve
    opts = launch.MountOptions(cache_dir=cache, cache_size=config.parse_size(cache_size),
                               allow_other=allow_other, prefetch_all=prefetch == "all",
                               switch_warm=warm_switch, switch_check=not no_warm,
                               catalog_poll=poll, digest=digest,
                               memory_bytes=config.parse_size(memory), timeout=timeout,
                               read_ahead_kb=config.parse_size(read_ahead) // 1024,
                               allow_model_change=allow_model_change, on_switch=on_switch,
                               metrics_file=os.path.abspath(metrics_file) if metrics_file else None,
                               debug=debug, passthrough=passthrough)
    if manifest_src and os.path.isfile(manifest_src):
        opts.watch = os.path.abspath(manifest_src)
    launch.check_outside(mountpoint, cache_dir=cache, log_file=log_file, manifest=opts.watch)
    if not foreground:
        launch.check_mountpoint(mountpoint)  # fail fast, with the message in this terminal
    try:
        m, store = finding.result()
    except MlfsError as e:
        if foreground:
            _ready_writer(ready_fd)(e)
        raise
    if foreground:
        _setup_logging(debug, log_file)
        ready = _ready_writer(ready_fd, echo=True)
        try:
            if early:  # mounted and reported first; pyfuse3 and trio are imported afterwards
                kmount, warning = launch.prepare(m, store, mountpoint, opts)
                _serve_early(kmount, ready, warning, m, store, mountpoint, opts)
            else:
                serve(m, store, mountpoint, opts, ready=ready)
        except MlfsError as e:
            ready(e)
            raise
        return

    # The daemon is this process, forked once the manifest is in hand: no second interpreter to
    # start, import and resolve again (docs/adr/0017).
    logf = Path(log_file) if log_file else cache / "logs" / f"mount-{os.getpid()}.log"
    if early:
        # This process makes the kernel mount and reports it; the daemon imports pyfuse3 and trio
        # afterwards, while the caller goes on (requests wait in the kernel until it answers).
        kmount, warning = launch.prepare(m, store, mountpoint, opts)

        def child(_fd) -> None:
            _setup_logging(debug, str(logf))
            _serve_early(kmount, None, None, m, store, mountpoint, opts)
        try:
            pid, _ = launch.daemonize(child, logf, wait=False)
        except BaseException:
            kmount.unmount()
            raise
        os.close(kmount.fd)  # the daemon's now: its end closes the connection
    else:
        def child(fd: int) -> None:
            _setup_logging(debug, str(logf))
            serve(m, store, mountpoint, opts, ready=_ready_writer(fd))

        pid, warning = launch.daemonize(child, logf)
    if warning:
        click.echo(f"mlfs: warning: {warning}", err=True)
    click.echo(f"mounted at {mountpoint} (pid {pid}, log {logf})", err=True)
    # The mount is up and this process has nothing left to do: skip the interpreter's teardown of
    # the ~400 modules a mount imports (~0.03 s that a script waiting on `mlfs mount` would wait).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_early(kmount, ready, warning, *args) -> None:
    """Serve a kernel mount made already (launch.prepare, which left SIGTERM and SIGHUP blocked):
    take over the signals, report the mount, then import pyfuse3 and trio and serve; the mount
    is taken down however this ends."""
    from . import launch

    try:
        early = launch.EarlySignals()
        if ready is not None:
            ready(warning)
        from .mount import serve

        serve(*args, kmount=kmount, early=early)
    finally:
        kmount.unmount()


class _Background:
    """``fn()`` run in a thread from now on; ``result()`` waits for it and returns its value or
    raises its exception, in the caller's thread.  Not a ``concurrent.futures`` executor: its
    thread is a daemon, so a usage error raised meanwhile ends ``mlfs mount`` at once instead of
    waiting out a store that does not answer."""

    def __init__(self, fn) -> None:
        import threading

        self._fn = fn
        self._out: tuple = ()
        self._thread = threading.Thread(target=self._run, name="mlfs-resolve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._out = (self._fn(), None)
        except BaseException as e:  # noqa: BLE001 - handed to result()'s caller
            self._out = (None, e)

    def result(self):
        self._thread.join()
        value, error = self._out
        if error is not None:
            raise error
        return value


def _ready_writer(fd: int | None, echo: bool = False):
    """The ``ready`` callback of :func:`mlfs.mount.serve` writing to the parent's pipe: ``None``
    is ready, a string ready with a warning, an exception a failure before readiness.  Once."""
    done = []

    def ready(outcome) -> None:
        if echo and isinstance(outcome, str):
            click.echo(f"mlfs: warning: {outcome}", err=True)
        if fd is None or done:
            return
        done.append(True)
        msg = ("ready" if outcome is None else f"ready: {outcome}" if isinstance(outcome, str)
               else f"error: {outcome}")
        try:
            os.write(fd, msg.encode())
            os.close(fd)
        except OSError:
            pass  # the parent is gone: nobody to tell
    return ready


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if files are open.")
def umount(mountpoint, lazy):
    """Unmount an mlfs mount (also clears a mount whose process died)."""
    from .client import unmount

    unmount(mountpoint, lazy)


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--prometheus", is_flag=True, help="Prometheus text exposition format.")
def stats(mountpoint, as_json, prometheus):
    """Counters of a running mount: bytes served and fetched, cache hits, errors, version."""
    from .client import prometheus as to_prometheus, read_stats

    s = read_stats(mountpoint)
    if prometheus:
        click.echo(to_prometheus(s), nl=False)
    elif as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        for k, v in s.items():
            click.echo(f"{k:<22} {v}")


@main.group()
def cache():
    """Inspect and maintain the shared chunk cache."""


def _cache_opts(f):
    f = click.option("--cache-size", default=config.DEFAULT_CACHE_SIZE, show_default=True,
                     help="Budget to prune down to.")(f)
    return click.option("--cache-dir", type=click.Path(file_okay=False),
                        help="Cache directory [default: $XDG_CACHE_HOME/mlfs].")(f)


def _open_cache(cache_dir, cache_size):
    from pathlib import Path

    from .cache import ChunkCache

    return ChunkCache(Path(cache_dir) if cache_dir else config.default_cache_dir(),
                      config.parse_size(cache_size))


@cache.command("stats")
@_cache_opts
@click.option("--json", "as_json", is_flag=True)
def cache_stats(cache_dir, cache_size, as_json):
    """Chunks, whole copies of files (docs/adr/0035) and bytes in the cache."""
    from .report import human

    s = _open_cache(cache_dir, cache_size).stats()
    click.echo(json.dumps(s) if as_json else
               f"{s['cache_dir']}: {s['chunks']} chunk files, {s['whole_files']} whole copies "
               f"({human(s['whole_file_bytes'])}, holding {s['chunks_in_whole_files']} chunks), "
               f"{human(s['bytes'])} of {human(s['max_bytes'])}")


@cache.command("prune")
@_cache_opts
def cache_prune(cache_dir, cache_size):
    """Evict down to --cache-size and repair the index."""
    click.echo(json.dumps(_open_cache(cache_dir, cache_size).prune()))


@cache.command("clear")
@_cache_opts
def cache_clear(cache_dir, cache_size):
    """Remove every cached chunk (mounts refetch what they need)."""
    n = _open_cache(cache_dir, cache_size).clear()
    click.echo(f"removed {n} chunks", err=True)


def _store_arg(f):
    f = ENDPOINT_OPT(f)
    return click.argument("store_url", metavar="STORE")(f)


def _open(store_url, endpoint_url):
    from .stores import open_store

    return open_store(store_url, endpoint_url=endpoint_url)


@main.command("ls")
@_store_arg
@click.argument("model_id", required=False, metavar="[ID]")
@click.option("--filter", "-f", "filters", multiple=True, metavar="KEY=VALUE|KEY~TEXT",
              help="library=transformers, tag=nlp, description~embedding, any metadata key. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(store_url, endpoint_url, model_id, filters, as_json):
    """Models and versions in STORE, with sizes, unique bytes and metadata; store totals at the end."""
    from .catalog import parse_filter, versions
    from .report import human

    vs, totals = versions(_open(store_url, endpoint_url), model_id, [parse_filter(f) for f in filters])
    if as_json:
        click.echo(json.dumps({"versions": [v.to_json() for v in vs], "store": totals}, indent=1))
        return
    rows = [("ID@VERSION", "CREATED", "LIBRARY", "SIZE", "UNIQUE", "ALIASES", "TAGS", "DESCRIPTION")]
    for v in vs:
        m = v.manifest
        rows.append((m.ref, m.created, m.metadata.get("library") or "-", human(m.logical_size),
                     human(v.unique_bytes), ",".join(v.aliases) or "-",
                     ",".join(m.metadata.get("tags", [])) or "-",
                     (m.metadata.get("description") or "")[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    t = totals
    if t["stored_bytes"] is None:
        click.echo(f"\n{t['models']} models, {t['versions']} versions: {human(t['logical_bytes'])} "
                   f"logical, {human(t['referenced_bytes'])} referenced (dedup ratio "
                   f"{t['dedup_ratio'] or '-'}x)")
        return
    click.echo(f"\n{t['models']} models, {t['versions']} versions: {human(t['logical_bytes'])} logical, "
               f"{human(t['stored_bytes'])} stored in {t['chunks']} chunks "
               f"(dedup ratio {t['dedup_ratio'] or '-'}x; {human(t['unreferenced_bytes'])} unreferenced)")


@main.command("rm")
@_store_arg
@click.argument("ref", metavar="ID@VERSION")
def rm_cmd(store_url, endpoint_url, ref):
    """Remove a version's manifest (and aliases pointing at it). Chunks are left to `mlfs gc`."""
    from .catalog import remove
    from .manifest import parse_ref

    model_id, version = parse_ref(ref)
    for alias in remove(_open(store_url, endpoint_url), model_id, version):
        click.echo(f"mlfs: warning: removed alias {model_id}/{alias} (it pointed at {version})", err=True)
    click.echo(f"removed {ref}", err=True)


@main.command("gc")
@_store_arg
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
@click.option("--grace", default=config.GC_GRACE, show_default=True,
              help="Keep unreferenced chunks younger than this (a generate may be publishing them).")
@click.option("--json", "as_json", is_flag=True)
def gc_cmd(store_url, endpoint_url, dry_run, grace, as_json):
    """Delete chunks that no manifest references (safe beside a running generate)."""
    from .catalog import gc, parse_duration
    from .report import human

    res = gc(_open(store_url, endpoint_url), parse_duration(grace), dry_run)
    if as_json:
        click.echo(json.dumps(res.to_json()))
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {res.deleted} chunks ({human(res.deleted_bytes)}); kept {res.kept_recent} "
               f"unreferenced chunks younger than {grace} ({human(res.kept_bytes)}); "
               f"{res.referenced} chunks referenced")


@main.command("verify")
@_store_arg
@click.option("--deep", is_flag=True, help="Also download and re-hash every chunk.")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(store_url, endpoint_url, deep, as_json):
    """Check that every chunk of every manifest is present (and, with --deep, intact)."""
    from .catalog import verify

    damage, summary = verify(_open(store_url, endpoint_url), deep)
    if as_json:
        click.echo(json.dumps({**summary, "damage": [d.__dict__ for d in damage]}, indent=1))
    else:
        for d in damage:
            click.echo(str(d))
        click.echo(f"{summary['manifests']} manifests, {summary['chunks_checked']} chunks checked"
                   f"{' (deep)' if deep else ''}: {summary['damaged_chunks']} damaged", err=True)
    if damage:
        sys.exit(1)


@main.command("serve")
@_store_arg
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Address to listen on (0.0.0.0:PORT for every interface).")
@_chunk_cache_opts
@click.option("--ttl", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds manifests, aliases and the index may be cached (here and in front).")
@click.option("--access-log", is_flag=True, help="Log every request.")
def serve_cmd(store_url, endpoint_url, listen, cache_dir, cache_size, memory, ttl, access_log):
    """Serve STORE read-only over HTTP through this host's verified cache (an edge for a site:
    mount http://HOST:PORT, or put nginx/Varnish/a CDN in front)."""
    from pathlib import Path

    from .buffers import reuse_freed_memory
    from .cache import ChunkCache
    from .fetch import ChunkSource
    from .serve import EdgeApp, run

    _setup_logging(False, None)
    reuse_freed_memory()  # it fetches and decodes chunks as the mount does (docs/adr/0031)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{listen!r} is not HOST:PORT", param_hint="--listen")
    store = _open(store_url, endpoint_url)
    store.check()
    cache = ChunkCache(Path(cache_dir) if cache_dir else config.default_cache_dir(),
                       config.parse_size(cache_size))
    source = ChunkSource(store, cache, memory_bytes=config.parse_size(memory))
    app = EdgeApp(store, source, ttl=ttl)
    run(app, listen, access_log=access_log,
        ready=lambda bound: click.echo(f"serving {store.describe()} on {', '.join(bound)}", err=True))
    source.flush()


@main.command("index")
@_store_arg
def index_cmd(store_url, endpoint_url):
    """Rebuild STORE's index.json (what HTTP readers list from); generate, rm and alias keep it
    current, so this repairs a store written by an older mlfs or edited by hand."""
    from .catalog import rebuild_index, require_writable

    store = _open(store_url, endpoint_url)
    require_writable(store, "index")
    store.check()
    rebuild_index(store)
    click.echo(f"rebuilt {store.describe()}/index.json", err=True)


@main.group()
def alias():
    """Named pointers to versions (stable, canary...), stored in the store."""


@alias.command("set")
@_store_arg
@click.argument("model_id", metavar="ID")
@click.argument("name", metavar="ALIAS")
@click.argument("version")
def alias_set(store_url, endpoint_url, model_id, name, version):
    """Point ID/ALIAS at VERSION (which must exist)."""
    from .catalog import set_alias

    set_alias(_open(store_url, endpoint_url), model_id, name, version)
    click.echo(f"{model_id}/{name} -> {version}", err=True)


@alias.command("ls")
@_store_arg
@click.argument("model_id", metavar="ID", required=False)
def alias_ls(store_url, endpoint_url, model_id):
    """List aliases."""
    from .catalog import list_aliases

    for (mid, version), names in sorted(list_aliases(_open(store_url, endpoint_url)).items()):
        if model_id in (None, mid):
            for n in names:
                click.echo(f"{mid}/{n} -> {version}")


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("manifest", required=False)
@_manifest_args
@click.option("--warm", is_flag=True, help="Fetch every chunk the new version lacks before the "
              "flip; if one cannot be had, stay on the old version.")
@click.option("--no-warm", is_flag=True, help="Flip at once, without checking that the store "
              "holds the new chunks; fetch them in the background (reads first).")
@click.option("--digest", help="Refuse the switch unless the manifest has this digest.")
@click.option("--allow-model-change", is_flag=True,
              help="Allow switching to a manifest of another model id.")
@click.option("--json", "as_json", is_flag=True)
def switch(mountpoint, manifest, store_url, endpoint_url, model_id, version, warm, no_warm,
           digest, allow_model_change, as_json):
    """Switch a live mount to another version; returns once it serves the new one.

    By default the mount checks that the store holds every chunk the new version needs and the
    host lacks (or refuses the switch), flips, and fetches them in the background, reads first.

    \b
      mlfs switch /mnt/model minilm-v2.json
      mlfs switch /mnt/model --store s3://models --version v2     (same model id)
    """
    from .client import read_stats, request_switch, temp_manifest
    from .report import human
    from .resolve import resolve

    stats = read_stats(mountpoint)
    if not stats.get("control"):
        raise click.ClickException(f"{mountpoint} does not accept switches")
    if manifest is None and version and not model_id:
        model_id = stats.get("id")
    m, _ = resolve(manifest, store_url, model_id=model_id, version=version, endpoint_url=endpoint_url)
    if warm and no_warm:
        raise click.UsageError("--warm and --no-warm exclude each other")
    kw = {"warm": warm, "check": not no_warm, "digest": digest,
          "allow_model_change": allow_model_change}
    if manifest and os.path.isfile(manifest):
        result = request_switch(stats["control"], manifest, **kw)
    else:
        with temp_manifest(m.dumps()) as path:
            result = request_switch(stats["control"], path, **kw)
    if as_json:
        click.echo(json.dumps(result))
    else:
        mode = result.get("mode", "warm")
        if mode == "warm":
            done = (f"fetched {human(result['bytes_fetched'])} ({result['bytes_fetched']} bytes) "
                    f"in {result['warm_seconds']:.2f}s")
        elif mode == "checked":
            done = (f"the store holds the {result['checked_chunks']} chunks it lacks (checked in "
                    f"{result['warm_seconds']:.2f}s); fetching them in the background")
        else:
            done = "flipped at once; fetching in the background"
        if result.get("whole_copies"):
            n = result["whole_copies"]
            done += f"; whole copies of {n} file(s) loaded before to follow"
        click.echo(f"{result['from']} -> {result['to']}: {done}, "
                   f"flip {result['flip_seconds'] * 1000:.1f} ms", err=True)


if __name__ == "__main__":
    main()
