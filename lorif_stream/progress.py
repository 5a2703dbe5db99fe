"""Progress bars with rates and ETA on stderr (tracking is separate from the math it reports on)."""
from __future__ import annotations

import sys
import time


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress("build", total=N, unit="ex") as p: p.update(n, nbytes=...)`.

    Redraws in place on a terminal (at most 10×/s); elsewhere (CI logs, pipes) prints a line every
    `log_every` seconds, so long jobs stay visible without flooding the log. `enabled=False` is silent.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
                 log_every: float = 10.0, stream=None, detail=None):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.detail = detail  # optional () -> str appended to the line, e.g. the cost over the model
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.1 if self.tty else log_every
        self.count = 0
        self.nbytes = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.count += n
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now, final=False)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.count / elapsed
        parts = [self.desc]
        parts.append(f"{self.count:,}/{self.total:,} {self.unit}" if self.total else f"{self.count:,} {self.unit}")
        parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.nbytes:
            parts.append(f"{self.nbytes / 1e6:,.1f} MB ({self.nbytes / 1e6 / elapsed:,.1f} MB/s)")
        if self.detail is not None and (extra := self.detail()):
            parts.append(extra)
        if self.total and rate > 0 and self.count < self.total:
            parts.append(f"ETA {_fmt_duration((self.total - self.count) / rate)}")
        else:
            parts.append(f"{_fmt_duration(elapsed)}")
        return "  ".join(parts)

    def _draw(self, now: float, final: bool) -> None:
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text.ljust(100) + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter(), final=True)
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
