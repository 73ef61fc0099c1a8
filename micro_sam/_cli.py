"""Shared pieces of micro_sam's command lines: one-line errors and warnings, exit codes, progress settings.

Every command is written as ``main(argv=None) -> int`` that calls :func:`run_main` with its implementation, so
that an expected failure (bad arguments, an unreadable input, a missing device, an unknown model, an unwritable
output, ...) ends with one line on stderr and a non-zero exit code instead of a traceback::

    def main(argv=None):
        return _cli.run_main(_main, argv, prog="micro_sam.my_command")

    def _main(argv):
        parser = _cli.ArgumentParser(prog="micro_sam.my_command", description="...")
        ...
        args = parser.parse_args(argv)
        if not os.path.exists(args.input_path):
            raise _cli.UsageError(f"the input {args.input_path!r} does not exist")
        ...
        return 0

Exit codes: 0 success, 1 the work failed (including ``ValueError`` / ``RuntimeError`` / ``OSError`` raised by
the library), 2 the command was called wrongly (argparse errors and :class:`UsageError`), 130 interrupted.
Set the environment variable ``MICRO_SAM_TRACEBACK=1`` to get the full traceback instead of the one line.

This module imports only the standard library, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, NoReturn, Optional, Sequence, Union

__all__ = [
    "ArgumentParser", "CommandError", "UsageError", "add_quiet_argument", "check_device", "check_writable",
    "load_input", "one_line", "run_main",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """An expected failure of a command: printed as ``<prog>: error: <message>``, exit code 1."""

    exit_code = EXIT_FAILURE


class UsageError(CommandError, ValueError):
    """A command called with invalid arguments or inputs: printed as one line, exit code 2 (also a ValueError)."""

    exit_code = EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line (no usage text) and raise :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` with argparse's message and a pointer to ``--help``."""
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(error: BaseException) -> str:
    """The message of an exception as a single line (continuation lines joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = f"missing key {error.args[0]!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for commands: ``<prog>: warning: <message>`` without the source line."""
    print(f"{_show_warning.prog}: warning: {one_line(message) if isinstance(message, Warning) else message}",
          file=sys.stderr if file is None else file, flush=True)


_show_warning.prog = "micro_sam"


def run_main(function: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
             prog: str = "micro_sam") -> int:
    """Run a command's implementation and turn expected failures into one line on stderr and an exit code.

    Warnings raised while the command runs are printed as ``<prog>: warning: <message>`` (one line, no source
    line). ``SystemExit`` (e.g. from ``--help``) passes through.

    Args:
        function: The implementation, called as ``function(argv)``; it returns the exit code (None means 0).
        argv: The arguments (None: ``sys.argv[1:]``).
        prog: The command's name, used as the prefix of the error line.

    Returns:
        The exit code: the function's result, 1 for a failure, 2 for a usage error, 130 for Ctrl-C.
    """
    show_traceback = os.environ.get("MICRO_SAM_TRACEBACK", "") not in ("", "0")
    with warnings.catch_warnings():
        if not show_traceback:
            _show_warning.prog = prog
            warnings.showwarning = _show_warning
        try:
            result = function(None if argv is None else list(argv))
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except (CommandError, ValueError, RuntimeError, OSError, KeyError, ImportError) as error:
            if show_traceback:
                raise
            sys.stdout.flush()
            print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
            return getattr(error, "exit_code", EXIT_FAILURE)
    return 0 if result is None else int(result)


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``-q/--quiet`` (no progress bars or messages, only results and errors) to a parser."""
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="Show no progress bars or messages, only the results and errors.")


def check_device(device: Optional[str]) -> str:
    """The torch device for ``-d/--device``; an unavailable or unknown device is a :class:`UsageError`."""
    from . import util

    try:
        return util.get_device(device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(str(error)) from None


def check_writable(path: Union[str, os.PathLike], what: str = "output") -> None:
    """Fail (:class:`UsageError`) unless ``path`` can be created: its nearest existing folder must be writable.

    Missing folders on the way are allowed (the commands create them).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write the {what} {path!r}: {parent!r} is a file, not a folder")
    import tempfile

    try:  # a real write is the only reliable test (os.access says yes to root, ignores ACLs, ...)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise UsageError(f"cannot write the {what} {path!r}: the folder {parent!r} is not writable "
                         f"({error.strerror or error})") from None


def load_input(path: str, key: Optional[str] = None, ndim: Optional[int] = None, what: str = "input"):
    """Read an image or volume for a command and check it, before any model is loaded.

    Files are read completely (NaN and infinite values are checked); datasets in containers (``key``) are
    opened lazily and only their shape is checked.

    Args:
        path: An image file, or a container file / folder (zarr, n5, hdf5) together with ``key``.
        key: The dataset inside a container.
        ndim: 2 or 3, or None to infer it (see ``micro_sam._image.infer_ndim``).
        what: How the input is called in error messages.

    Returns:
        The array (a lazy zarr / h5py-backed array for containers) and its spatial dimensionality (2 or 3).

    Raises:
        UsageError: The input does not exist, cannot be read, is empty, holds NaN, or has an invalid shape.
    """
    from . import util
    from ._image import infer_ndim, validate_array

    try:
        data = util.load_image_data(path, key, lazy_loading=key is not None)
        validate_array(data, f"the {what} {path!r}")
        return data, infer_ndim(data, ndim)
    except ValueError as error:
        raise UsageError(str(error)) from None
