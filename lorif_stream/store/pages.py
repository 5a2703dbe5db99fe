"""Keep reading RSS bounded: drop this process's mappings of index pages once decoded.

Values are read zero-copy from LMDB's read-only memory map, and every page touched stays mapped
(and counted in RSS) until the kernel needs it back; scanning a 100 GB index would then show a
100 GB RSS. madvise(MADV_DONTNEED) on a read-only shared file mapping only unmaps: the data stay
in the page cache, and a later read faults them back in.

Two levels: each decoded value's inner pages at once (:func:`release_pages`), and, every
:data:`RELEASE_EVERY_BYTES` read, the whole mapping (:class:`MapReleaser`). The second catches
what the first cannot: the pages a value shares with its neighbours, the pages the kernel maps
around each fault, and the B-tree and id pages (bench_scale measured ~30 KB a value and ~85 B a
row left mapped without it). Unmapping pages that another thread is reading is safe: they fault
back in from the page cache, with the same bytes.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None

_MIN_BYTES = 1 << 16  # small values share pages with their neighbours: not worth a syscall
RELEASE_EVERY_BYTES = 32 << 20


def release_pages(value) -> None:
    """Unmap the whole pages inside a zero-copy LMDB value (no-op for copies and off Linux)."""
    if _madvise is None or not isinstance(value, memoryview) or value.nbytes < _MIN_BYTES:
        return
    addr = np.frombuffer(value, np.uint8).ctypes.data
    start = -(-addr // _PAGE) * _PAGE
    end = (addr + value.nbytes) // _PAGE * _PAGE
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)


class MapReleaser:
    """Unmap a whole read-only file mapping after every ``every`` bytes noted.

    ``bounds`` returns where the file is mapped now (an object with ``start`` and ``end``, or
    one without them when that is unknown): a writer's file grows between releases.
    """

    def __init__(self, bounds, every: int = RELEASE_EVERY_BYTES):
        self.bounds = bounds
        self.every = every
        self._since = 0

    def note(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= self.every:
            self.release()

    def release(self) -> None:
        self._since = 0
        where = self.bounds()
        start, end = getattr(where, "start", None), getattr(where, "end", None)
        if _madvise is None or start is None or end is None or end <= start:
            return
        start = start // _PAGE * _PAGE
        _madvise(start, -(-(end - start) // _PAGE) * _PAGE, _MADV_DONTNEED)
