"""Keep reading RSS bounded: drop this process's mappings of index pages once decoded.

Values are read zero-copy from LMDB's read-only memory map, and every page touched stays mapped
(and counted in RSS) until the kernel needs it back; scanning a 100 GB index would then show a
100 GB RSS. madvise(MADV_DONTNEED) on a read-only shared file mapping only unmaps: the data stay
in the page cache, and a later read faults them back in.
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


def release_pages(value) -> None:
    """Unmap the whole pages inside a zero-copy LMDB value (no-op for copies and off Linux)."""
    if _madvise is None or not isinstance(value, memoryview) or value.nbytes < _MIN_BYTES:
        return
    addr = np.frombuffer(value, np.uint8).ctypes.data
    start = -(-addr // _PAGE) * _PAGE
    end = (addr + value.nbytes) // _PAGE * _PAGE
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)
