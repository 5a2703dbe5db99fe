"""Peak resident memory of this process over a block of code (psutil, sampled in a thread)."""
from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """`with PeakRSS() as m: ...` then m.base, m.peak and m.delta (= peak - base), in bytes.

    Samples every 5 ms: a spike shorter than that can be missed, which is fine for the
    block-streaming loops measured here (they hold each buffer for far longer).
    """

    def __init__(self):
        self.proc = psutil.Process()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.base
