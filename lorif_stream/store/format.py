"""Versioned layout of the on-disk index (see docs/FORMAT.md).

Bump FORMAT_VERSION on any change to keys, block headers, metadata schema or codecs;
readers refuse any version they do not know instead of guessing.
"""
from __future__ import annotations

FORMAT_VERSION = 3
# v1 indexes (random projections only, no whitening records) still open and query.
SUPPORTED_VERSIONS = (1, 2, 3)

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
# LMDB transaction id of the last write, written by every write transaction: a reader whose
# snapshot id differs is reading an older state that LMDB picked from a damaged header page.
META_COMMIT = b"commit"
META_STATE_PREFIX = b"state:"
# JSON {"arrays": [...], "state": [...]}: the names put_state has stored, so that a record whose key
# was damaged reads as missing-but-listed (corrupt), not as absent (which a caller may take as "none")
META_MANIFEST = b"manifest"

DATA_FILE = "data.mdb"
LMDB_LOCK_FILE = "lock.mdb"
# flock'ed by the one writer for its whole life, holding its pid (readers never take it; a reader
# that cannot register with LMDB takes it shared, see lmdb_store._open_env)
WRITER_LOCK_FILE = "writer.lock"

# Checksum framing of JSON records written since format 2: magic, crc32 (u32 LE) of the JSON
# bytes, the JSON bytes. JSON never starts with "L", so unframed records of older indexes still read.
JSON_MAGIC = b"LRFJ"
# First byte of a checksummed row -> id value; 0xFF never starts UTF-8, so plain (older) ids still read.
ID_VALUE_MAGIC = b"\xff"


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


class IndexCorruptError(CorruptBlockError):
    """LMDB's own structures are damaged (truncated file, bad pages, inconsistent header pages)."""


class WriterBusyError(IndexError_):
    """Another process holds the index's writer lock: one writer at a time."""
