"""Progress of long jobs, on a terminal and in logs.

``progress_bar(total, desc, unit)`` returns a tqdm bar when stderr is a terminal, and otherwise a
``LineProgress`` that prints one plain line every few seconds (count, rate, ETA), so a job whose
stderr goes to a file or a pipe (nohup, CI, a cluster's log collector) still says how far it is,
without the carriage-return clutter a bar writes there. Both have the same small interface:
``update(n)``, ``n``, ``total``, ``set_postfix(**kw)``, ``close()``, and work as context managers.

``quiet_gguf_conversion()`` keeps the transformers GGUF de-quantisation bar (a bare tqdm that
ignores transformers' own progress-bar switch) off stderr when stderr is not a terminal.

The line interval is ``DIVGEN_PROGRESS_INTERVAL`` seconds (default 10).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, TextIO

DEFAULT_INTERVAL_S = 10.0


def interval_from_env() -> float:
    raw = os.environ.get("DIVGEN_PROGRESS_INTERVAL", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def format_duration(seconds: float) -> str:
    """12 -> '12s', 75 -> '1m15s', 3725 -> '1h02m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class LineProgress:
    """A progress report for logs: one line per ``interval`` seconds and one at close.

    ``desc: 120/400 ex (30%), 2.41 ex/s, ETA 1m56s``. The rate counts only this run's work
    (``initial`` is what a resumed job already had), so a resumed job's ETA is honest.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
                 interval: float | None = None, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self._initial = initial
        self._interval = interval_from_env() if interval is None else interval
        self._file = file
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._postfix = ""
        self._closed = False

    # tqdm-compatible surface -----------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._emit(now)

    def set_postfix(self, **kwargs) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(self._clock(), final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------
    def rate(self, now: float) -> float:
        elapsed = now - self._start
        return (self.n - self._initial) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float, final: bool = False) -> str:
        rate = self.rate(now)
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s")
        if final:
            parts.append(f"done in {format_duration(now - self._start)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        else:
            parts.append("ETA ?")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        out = self._file or sys.stderr
        print(self.line(now, final), file=out, flush=True)


class _NoProgress:
    """Disabled progress: counts, prints nothing."""

    def __init__(self, total=None, initial: int = 0):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, initial: int = 0,
                 interval: float | None = None, **tqdm_kwargs):
    """A tqdm bar on a terminal, periodic lines otherwise, nothing when ``enabled`` is False."""
    if not enabled:
        return _NoProgress(total, initial)
    if stderr_is_terminal():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, **tqdm_kwargs)
    return LineProgress(total, desc, unit, initial=initial, interval=interval)


@contextlib.contextmanager
def quiet_gguf_conversion(log: Callable[[str], None] | None = None):
    """Silence transformers' GGUF de-quantisation bar unless stderr is a terminal.

    transformers (``modeling_gguf_pytorch_utils``) wraps its tensor loop in a bare ``tqdm`` that
    its ``disable_progress_bar()`` does not reach; in a log file it is hundreds of carriage-return
    frames. Off a terminal it is swapped, for the duration, for a disabled one and ``log`` gets one
    line instead.
    """
    if stderr_is_terminal():
        yield
        return
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing to silence
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return original(*args, **kwargs)

    if log is not None:
        log("converting the GGUF weights once (cached afterwards)")
    gguf_utils.tqdm = silent
    try:
        yield
    finally:
        gguf_utils.tqdm = original
