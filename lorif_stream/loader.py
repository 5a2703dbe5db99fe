"""BlockLoader: an index's decoded blocks as device tensors, read and decoded ahead of their use.

Used by every pass over the stored factors: the query's scoring stream and fit's sketch
catch-up, EK-FAC catch-up and refinement passes.

On CUDA the host buffers are pinned and the host->device copies run on a side stream, so block
n+1 is read, decoded and copied while block n is computed on. Two hazards come with that, both
handled here, neither visible on a CPU:
  * a host buffer may be refilled only once its asynchronous copy is done: it goes back to the
    ring with the copy's event, and whoever refills it waits for that event first;
  * the device tensors are allocated on the side stream but used on the consumer's stream: each
    is marked with record_stream(consumer), or the caching allocator would hand its memory to a
    later block's copy on the side stream while the consumer's kernels still read it.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterator, Sequence

import torch

from .store import BlockBuffers, BlockDecoder, CorruptBlockError, Snapshot


class BlockLoader:
    """Iterates (first_row, rows, [(L, R) per layer]) over rows [start, stop) of `layers`, as
    tensors on `device` (fp32), decoding ahead in `threads` threads (0 = inline).

    `buffers` host buffer sets form a ring: a set is refilled once the consumer (on the CPU) or the
    set's host->device copy (on CUDA) is done with it. On the CPU the yielded tensors view a ring
    buffer and are valid until the next block is asked for; on CUDA they are the consumer's own.
    """

    def __init__(self, snap: Snapshot, layers: Sequence[int], device: torch.device, buffers: int = 2,
                 threads: int = 1, start: int = 0, stop: int | None = None):
        if buffers < 1:
            raise ValueError(f"buffers={buffers} must be >= 1")
        if threads < 0:
            raise ValueError(f"threads={threads} must be >= 0")
        self.snap, self.layers, self.device = snap, list(layers), torch.device(device)
        self.threads = threads
        self.start, self.stop = start, snap.rows if stop is None else min(stop, snap.rows)
        pin = self.device.type == "cuda"
        # decode straight into page-locked memory so that host->device copies can be asynchronous
        self.sets = [BlockBuffers(snap.layout, pin=pin) for _ in range(buffers)]
        self.read_seconds = 0.0
        self.bytes_read = 0

    def _decode(self, decoder: BlockDecoder, bufs: BlockBuffers, first_row: int, value0) -> int:
        t = time.perf_counter()
        n = None
        for j, layer in enumerate(self.layers):
            value = value0 if j == 0 else self.snap.value_at(layer, first_row)
            self.bytes_read += len(value)
            L, _ = self.snap.decode(layer, first_row, value, bufs, decoder)
            if n is not None and L.shape[0] != n:
                raise CorruptBlockError(f"blocks at row {first_row} hold {n} and {L.shape[0]} rows in different "
                                        f"layers (the index is damaged: run verify)")
            n = L.shape[0]
        self.read_seconds += time.perf_counter() - t
        return n

    def _values(self):
        return self.snap.layer_values(self.layers[0], self.start, self.stop)

    def __iter__(self) -> Iterator[tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        if self.start >= self.stop:
            return iter(())
        return self._inline() if self.threads == 0 else self._threaded()

    def _inline(self):
        decoder = BlockDecoder()
        copied: list = [None] * len(self.sets)
        for b, (first_row, value) in enumerate(self._values()):
            i = b % len(self.sets)
            if copied[i] is not None:
                copied[i].synchronize()  # its last copy may still be reading it
            n = self._decode(decoder, self.sets[i], first_row, value)
            first, rows, tensors, copied[i] = self._stage(self.sets[i], first_row, n)
            yield first, rows, tensors

    def _threaded(self):
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for i in range(len(self.sets)):
            free.put((i, None))
        stop = threading.Event()

        def work():
            decoder = BlockDecoder()
            try:
                for first_row, value in self._values():
                    i, copied = free.get()
                    if stop.is_set() or i < 0:
                        return
                    if copied is not None:
                        copied.synchronize()  # the set's host->device copy must be done before it is refilled
                    ready.put((i, first_row, self._decode(decoder, self.sets[i], first_row, value)))
                ready.put(None)
            except BaseException as e:
                ready.put(e)

        thread = threading.Thread(target=work, name="lorif-block-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                i, first_row, n = item
                first, rows, tensors, copied = self._stage(self.sets[i], first_row, n)
                if copied is not None:
                    # the set goes back at once: its copy is queued and the loader waits for it, so
                    # no ring size (buffers=1 included) ever waits on the consumer
                    free.put((i, copied))
                    yield first, rows, tensors
                else:
                    yield first, rows, tensors
                    free.put((i, None))  # the consumer is done with the views of this set
        finally:
            stop.set()
            free.put((-1, None))  # unblock a loader waiting for a buffer
            thread.join()

    def _stage(self, bufs: BlockBuffers, first_row: int, n: int):
        """The block's rows within [start, stop) as tensors on the device, and the event its
        host->device copies complete (None when nothing is copied asynchronously)."""
        lo, hi = max(self.start, first_row), min(self.stop, first_row + n)
        a, b = lo - first_row, hi - first_row
        host = [(torch.from_numpy(bufs.L[layer][a:b]), torch.from_numpy(bufs.R[layer][a:b])) for layer in self.layers]
        if self.device.type == "cpu":
            return lo, hi - lo, host, None
        if self.device.type != "cuda":
            return lo, hi - lo, [(L.to(self.device), R.to(self.device)) for L, R in host], None
        consumer = torch.cuda.current_stream(self.device)
        side = self._side_stream()
        out = []
        with torch.cuda.stream(side):
            for L, R in host:
                L, R = L.to(self.device, non_blocking=True), R.to(self.device, non_blocking=True)
                L.record_stream(consumer)
                R.record_stream(consumer)
                out.append((L, R))
            copied = torch.cuda.Event()
            copied.record(side)
        consumer.wait_event(copied)
        return lo, hi - lo, out, copied

    def _side_stream(self) -> "torch.cuda.Stream":
        side = getattr(self, "_side", None)
        if side is None:
            side = self._side = torch.cuda.Stream(self.device)
        return side
