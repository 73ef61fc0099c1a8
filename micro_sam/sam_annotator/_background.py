"""Messages to the user, and long work in a worker thread with a progress bar in napari.

Every message goes to the viewer (a napari notification) and to the command line (stderr / stdout), so users
who started a tool from a terminal see it there too.

:class:`TaskRunner` runs a function in a napari ``thread_worker``: the function gets ``pbar_init`` /
``pbar_update`` callbacks (the library's progress protocol) which move a napari progress bar through Qt
signals (so it is updated on the main thread). Its result is handed to a callback on the main thread. When the
tool is closed, running tasks are asked to stop: the next progress callback raises :class:`Cancelled`, the
library stops between two steps (embedding caches stay resumable), and no result callback touches the closed
viewer.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Set

from qtpy.QtCore import QObject, Signal


class Cancelled(Exception):
    """Raised inside a background task when the tool was closed or the task was cancelled."""


def show_error(message: str) -> None:
    """Show an error in the viewer (napari notification) and on stderr."""
    from napari.utils.notifications import show_error as napari_error

    print(f"micro_sam error: {message}", file=sys.stderr, flush=True)
    napari_error(message)


def show_warning(message: str) -> None:
    """Show a warning in the viewer and on stderr."""
    from napari.utils.notifications import show_warning as napari_warning

    print(f"micro_sam warning: {message}", file=sys.stderr, flush=True)
    napari_warning(message)


def show_info(message: str) -> None:
    """Show an information in the viewer and on stdout."""
    from napari.utils.notifications import show_info as napari_info

    print(message, flush=True)
    napari_info(message)


class _ProgressSignals(QObject):
    """Carries progress from the worker thread to the napari progress bar on the main thread."""

    init = Signal(int, str)
    update = Signal(int)


class TaskRunner:
    """Runs long work of one tool in worker threads; stops it when the tool goes away.

    Args:
        on_busy_changed: Called on the main thread with True when a task starts and False when none runs.
    """

    def __init__(self, on_busy_changed: Optional[Callable[[bool], None]] = None):
        self._workers: Set[Any] = set()
        self._closed = False
        self._on_busy_changed = on_busy_changed

    @property
    def closed(self) -> bool:
        """Whether the tool was closed (results are then dropped)."""
        return self._closed

    @property
    def busy(self) -> bool:
        """Whether a task is running."""
        return bool(self._workers)

    def run(
        self,
        function: Callable[..., Any],
        description: str,
        on_returned: Optional[Callable[[Any], None]] = None,
        on_error: Optional[Callable[[BaseException], None]] = None,
    ):
        """Run ``function(pbar_init=..., pbar_update=...)`` in a worker thread with a napari progress bar.

        Args:
            function: The work; it must accept the keyword arguments ``pbar_init(total, description)`` and
                ``pbar_update(n)`` and should call ``pbar_update`` between steps (that is where it can stop).
            description: The initial text of the progress bar.
            on_returned: Called on the main thread with the function's result (not after the tool closed).
            on_error: Called on the main thread with an exception (default: an error message in the viewer
                and on stderr); not called for :class:`Cancelled`.

        Returns:
            The started napari worker.
        """
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self._closed:
            raise Cancelled("The tool was closed.")
        pbar = progress(total=0, desc=description)
        signals = _ProgressSignals()
        signals.init.connect(lambda total, text: (pbar.reset(), setattr(pbar, "total", total),
                                                  pbar.set_description(text)))
        signals.update.connect(pbar.update)
        worker_box = {}

        def check_cancelled():
            worker = worker_box.get("worker")
            if self._closed or (worker is not None and worker.abort_requested):
                raise Cancelled(f"'{description}' was cancelled.")

        def pbar_init(total, text):
            check_cancelled()
            signals.init.emit(int(total or 0), str(text))

        def pbar_update(n=1):
            check_cancelled()
            signals.update.emit(int(n))

        def work():
            check_cancelled()
            return function(pbar_init=pbar_init, pbar_update=pbar_update)

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)  # errors go to on_error
        worker_box["worker"] = worker

        def returned(result):
            if not self._closed and on_returned is not None:
                try:
                    on_returned(result)
                except Exception as error:  # noqa: BLE001 - a failure in the GUI update is shown, not raised
                    show_error(f"{description} failed: {error}")

        def errored(error):
            if isinstance(error, Cancelled) or self._closed:
                return
            if on_error is not None:
                on_error(error)
            else:
                show_error(f"{description} failed: {error}")

        def finished():
            pbar.close()
            signals.deleteLater()
            self._workers.discard(worker)
            if not self._workers and self._on_busy_changed is not None and not self._closed:
                self._on_busy_changed(False)

        worker.returned.connect(returned)
        worker.errored.connect(errored)
        worker.finished.connect(finished)
        self._workers.add(worker)
        if self._on_busy_changed is not None:
            self._on_busy_changed(True)
        worker.start()
        return worker

    def close(self, wait_ms: Optional[int] = None) -> None:
        """Ask all tasks to stop; with ``wait_ms``, wait up to that long for them to finish.

        A task stops at its next progress step; a step that is running (one encoder pass) completes first.
        """
        self._closed = True
        for worker in list(self._workers):
            worker.quit()
        if wait_ms is not None:
            self.wait(wait_ms)

    def wait(self, timeout_ms: int = 60000) -> bool:
        """Wait (processing Qt events) until no task runs; returns whether they all finished in time."""
        import time

        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + timeout_ms / 1000
        while self._workers and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        QApplication.processEvents()
        return not self._workers
