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
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MlfsError as e:
            _fail(str(e), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001 - the promise is: no traceback, a clear line
            if os.environ.get("MLFS_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (MLFS_DEBUG=1 shows the traceback)", 1)


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
@click.option("--threads", default=8, show_default=True, help="Hashing/upload threads.")
def generate(model_dir, store_url, endpoint_url, model_id, version, prefetch, metadata, output,
             threads):
    """Store MODEL_DIR as deduplicated chunks and publish its manifest ID@VERSION."""
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
                  metadata=meta, progress=update, threads=threads)
    for w in res.warnings:
        click.echo(f"mlfs: warning: {w}", err=True)
    data = res.manifest.dumps()
    if output and output != "-":
        _write_atomic(output, data)
    elif output == "-" or not sys.stdout.isatty():
        sys.stdout.buffer.write(data)
    share = res.dedup_bytes / res.logical_bytes if res.logical_bytes else 0.0
    click.echo(f"{res.manifest.ref}: {res.files} files, {human(res.logical_bytes)} logical, "
               f"{res.unique_chunks} chunks; uploaded {res.new_chunks} new chunks "
               f"({human(res.new_bytes)}); deduplicated {human(res.dedup_bytes)} ({share:.1%}); "
               f"digest {res.manifest.digest}", err=True)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None


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
@click.argument("manifest", required=False)
@click.argument("dest_dir", type=click.Path(file_okay=False))
@_manifest_args
def export(manifest, dest_dir, store_url, endpoint_url, model_id, version):
    """Rebuild a manifest's files byte-exact into DEST_DIR (no FUSE needed)."""
    from .export import export as run
    from .report import human
    from .resolve import resolve

    m, store = resolve(manifest, store_url, model_id=model_id, version=version,
                       endpoint_url=endpoint_url)
    if store is None:
        raise click.UsageError("the manifest names no store: pass --store")
    bar, update = _progress(m.logical_size, f"export {m.ref}")
    with bar:
        n = run(m, store, dest_dir, progress=update)
    click.echo(f"{m.ref}: {len(m.files)} files, {human(n)} written to {dest_dir}, all verified",
               err=True)


if __name__ == "__main__":
    main()
