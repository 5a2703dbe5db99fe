"""Versioned layout of the on-disk index (see docs/FORMAT.md).

Bump FORMAT_VERSION on any change to keys, block headers, metadata schema or codecs;
readers refuse any version they do not know instead of guessing.
"""
from __future__ import annotations

FORMAT_VERSION = 2
# v1 indexes (random projections only, no whitening records) still open and query.
SUPPORTED_VERSIONS = (1, 2)

# Named LMDB databases inside the one environment.
DB_FACTORS = b"factors"
DB_META = b"meta"
DB_IDS = b"ids"
DB_SKETCH = b"sketch"

# Keys of the `meta` database.
META_FORMAT_VERSION = b"format_version"
META_LAYOUT = b"layout"
META_SETTINGS = b"settings"
META_ROWS = b"rows"

DATA_FILE = "data.mdb"


class IndexError_(Exception):
    """Base class of every error about an index on disk (message is one line, names the culprit)."""


class NotAnIndexError(IndexError_):
    pass


class UnsupportedVersionError(IndexError_):
    pass


class CorruptBlockError(IndexError_):
    pass


class IndexWriteError(IndexError_, OSError):
    """The file system refused a write (disk full, size limit, I/O error); nothing of it was committed."""


class WriteRefusedError(IndexError_, ValueError):
    """A write that would break an index invariant; nothing of it was committed."""
