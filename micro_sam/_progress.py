"""Progress display shared by the library and the command lines: one named bar per unit of work.

On a terminal a bar is a tqdm bar. When stderr is not a terminal (a log file, a pipe, a notebook's captured
output, a batch job), a bar is printed as plain lines instead, without carriage returns or escape codes::

    Compute image embeddings 3D: 16/16 in 12.3 s

(plus a line ``... 5/16 after 30 s`` at most every 30 seconds for long work). A bar is only created when its
total is known, so no unlabelled ``0it`` bar ever appears.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["progress_bar", "track"]

_LINE_INTERVAL_S = 30.0


class _LineProgress:
    """A tqdm-like bar for output that is not a terminal: a line at most every 30 s and one when it closes."""

    def __init__(self, total: int, desc: str, file) -> None:
        self.total, self.desc, self.n, self._file = int(total), desc, 0, file
        self._start = self._last = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if now - self._last >= _LINE_INTERVAL_S and self.n < self.total:
            self._last = now
            self._write(f"{self.desc}: {self.n}/{self.total} after {now - self._start:.0f} s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._write(f"{self.desc}: {self.n}/{self.total} in {time.perf_counter() - self._start:.1f} s")

    def _write(self, line: str) -> None:
        print(line, file=self._file, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, desc: str, file=None, terminal: Optional[bool] = None):
    """A named progress bar over ``total`` steps: tqdm on a terminal, plain lines otherwise.

    Args:
        total: The number of steps.
        desc: The name of the work, shown in front of the bar.
        file: The stream (default: ``sys.stderr`` at the time of the call).
        terminal: Force the terminal (True) or the line (False) display; None decides by ``file.isatty()``.

    Returns:
        An object with ``update(n=1)`` and ``close()``.
    """
    file = sys.stderr if file is None else file
    if terminal is None:
        terminal = _is_terminal(file)
    if not terminal:
        return _LineProgress(total, desc, file)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=file, dynamic_ncols=True)


def track(iterable, desc: str, total: Optional[int] = None, verbose: bool = True):
    """Iterate over ``iterable`` with a named progress bar (none when ``verbose`` is False).

    Args:
        iterable: What to iterate over.
        desc: The name of the work.
        total: The number of items (default: ``len(iterable)``).
        verbose: Show the bar.

    Yields:
        The items of ``iterable``.
    """
    if not verbose:
        yield from iterable
        return
    bar = progress_bar(len(iterable) if total is None else total, desc)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
