"""Two things the CUDA path needs beyond plain torch: the engine's own fp32 matmuls at full
precision whatever the caller set, and timings that count the device's work, not the launches.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls at IEEE precision inside (TF32 off), the caller's setting restored after.

    A task that sets torch.set_float32_matmul_precision("high") for its model would otherwise put
    the engine's factorisations, sketches and scores through TF32 (10-bit mantissas) on Ampere and
    later GPUs, and a CUDA index or query would no longer agree with the CPU's. The setting is
    process-wide, so it is switched only around the engine's own arithmetic, never the model's.
    """
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def exact(fn):
    """`fn` run inside exact_fp32()."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with exact_fp32():
            return fn(*args, **kwargs)

    return wrapper


class DeviceTimer:
    """Seconds spent in timed sections, device work included, without a host sync per section.

    On CUDA each section is bracketed by events on the current stream and the elapsed times are
    summed when `seconds` is read (one sync then); elsewhere it is the wall clock of the section.
    A perf_counter around asynchronous kernel launches would count the launches, not the work.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._host = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def section(self):
        if self.device.type != "cuda":
            t = time.perf_counter()
            try:
                yield
            finally:
                self._host += time.perf_counter() - t
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(self.device))
        try:
            yield
        finally:
            end.record(torch.cuda.current_stream(self.device))
            self._events.append((start, end))

    @property
    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._host += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events.clear()
        return self._host

    def add(self, seconds: float) -> None:
        self._host += seconds
