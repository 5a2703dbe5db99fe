"""BlockSink: the index's write pipeline — encode the next block while the previous one commits.

Two threads joined by a one-slot queue: an encoder (waits for the block's host copy, then codec
work, parallel across layers) and a committer (one LMDB transaction per block). Blocks commit in
the order they were put. An error in either stage is kept and re-raised to the caller at its
next put/drain; blocks after a failed one are dropped, never committed out of order.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence

import numpy as np

from .lmdb_store import IndexWriter, PendingBlock


class BlockSink:
    def __init__(self, writer: IndexWriter, *, allow_duplicate_ids: bool = False, depth: int = 2,
                 on_commit: Callable[[PendingBlock], None] | None = None):
        self.writer, self.allow_duplicate_ids, self.on_commit = writer, allow_duplicate_ids, on_commit
        self._inbox: queue.Queue = queue.Queue(maxsize=depth)
        self._encoded: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self._threads = [threading.Thread(target=self._encode_loop, name="lorif-encode", daemon=True),
                         threading.Thread(target=self._commit_loop, name="lorif-commit", daemon=True)]
        for t in self._threads:
            t.start()

    # -- producer side
    def put(self, first_row: int, factors: Sequence[tuple[np.ndarray, np.ndarray]], ids: Sequence[str],
            ready=None) -> None:
        """Queue one block (float32 arrays per layer). `ready.synchronize()`, when given, is waited
        for before the arrays are read (an asynchronous device->host copy)."""
        self.check()
        self._inbox.put((first_row, factors, ids, ready))

    def drain(self) -> None:
        """Wait until every queued block is committed (or failed)."""
        self._inbox.join()
        self._encoded.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._inbox.put(None)
        for t in self._threads:
            t.join()

    # -- stages
    def _encode_loop(self) -> None:
        while True:
            item = self._inbox.get()
            try:
                if item is None:
                    self._encoded.put(None)
                    return
                if self.error is None:
                    first_row, factors, ids, ready = item
                    if ready is not None:
                        ready.synchronize()
                    self._encoded.put(self.writer.encode(first_row, [(np.asarray(L), np.asarray(R)) for L, R in factors], ids))
            except BaseException as e:
                self.error = e
            finally:
                self._inbox.task_done()

    def _commit_loop(self) -> None:
        while True:
            block = self._encoded.get()
            try:
                if block is None:
                    return
                if self.error is None:
                    self.writer.commit(block, allow_duplicate_ids=self.allow_duplicate_ids)
                    self.bytes_written += block.nbytes
                    if self.on_commit is not None:
                        self.on_commit(block)
            except BaseException as e:
                self.error = e
            finally:
                self._encoded.task_done()
