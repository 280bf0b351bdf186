"""mlfs: deduplicated ML models as a lazy, verified, read-only FUSE filesystem.

The layers, each importing only those after it::

    cli → {mount, generate, export, report} → fs → {tree, cache, fetch} → stores → {manifest, errors, config}
"""

__version__ = "0.2.0"
