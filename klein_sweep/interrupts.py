"""Ctrl-C that is never lost. Python raises KeyboardInterrupt wherever the main thread happens to
be; inside a garbage-collector or weakref callback it is printed and swallowed ("Exception
ignored in ..."), and the sweep would go on as if nothing was pressed. The handler here also
remembers the request, and the sweep checks it between trials.

  install()            in the entry point
  raise_if_requested() at a safe point (between trials, after each training step)
  forget()             a process that goes on after an interrupt it handled (a test)
"""

from __future__ import annotations

import signal
import sys
import threading

_requested = threading.Event()
_default_unraisable = sys.unraisablehook


def _quiet_swallowed_interrupt(unraisable) -> None:
    """A Ctrl-C swallowed inside a __del__ or weakref callback is remembered above and acted on
    at the next safe point: printing its traceback would only bury the one line the user should
    read. Every other unraisable exception is reported as Python would."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested.is_set():
        return
    _default_unraisable(unraisable)


def _on_sigint(signum, frame):
    _requested.set()
    raise KeyboardInterrupt


def _on_sigint_once(signum, frame):
    first = not _requested.is_set()
    _requested.set()
    if first:  # a second signal must not break the clean-up the first one started
        raise KeyboardInterrupt


def install(raise_once: bool = False) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint_once if raise_once else _on_sigint)
        sys.unraisablehook = _quiet_swallowed_interrupt


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt


def forget() -> None:
    """The request handled: a later raise_if_requested passes again."""
    _requested.clear()
