"""One writer per index: an flock on `writer.lock` in the index directory, held while writing.

LMDB serializes write *transactions*, not writers: two appends each keep their own row count
between transactions, and interleaved they commit blocks over each other. So a writer takes
this lock before it reads anything and keeps it until it closes. flock (not fcntl record
locks) because it conflicts between two opens in one process too and is released by the kernel
when the holder dies, even by SIGKILL: a lock file left behind is never stale. The file holds
the holder's pid so that a refused writer can name it.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .format import WRITER_LOCK_FILE, WriterBusyError


def _holder(fd: int) -> str | None:
    # the holder writes its pid right after taking the lock: give it a moment
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return None


class WriterLock:
    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory) -> "WriterLock":
        directory = Path(directory)
        fd = os.open(directory / WRITER_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = (f"process {holder}" if holder else
                   "another process (a reader without write access to its lock.mdb, or a writer just starting)")
            raise WriterBusyError(f"index {directory} is being written by {who}: one writer at a time "
                                  f"(two would corrupt it); wait for it to finish") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no pid left to mislead a later refusal
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def shared_read_lock(directory) -> int | None:
    """For a reader that cannot register with LMDB (no write access to lock.mdb): a shared flock
    on writer.lock, so that no writer can start while it reads; refused while one is writing.
    Returns the descriptor to close when done, or None when there is no writer.lock to lock."""
    directory = Path(directory)
    try:
        fd = os.open(directory / WRITER_LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WriterBusyError(f"index {directory} is being written by process {holder or '?'}, and without write "
                              f"access to its lock.mdb this reader cannot register with LMDB (the writer could "
                              f"reuse pages under it): retry when the writer has finished") from None
    return fd
