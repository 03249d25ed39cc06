"""Ctrl-C that is never lost. Python raises KeyboardInterrupt wherever the main thread happens to
be; inside a garbage-collector or weakref callback it is printed and swallowed ("Exception
ignored in ..."), and the sweep would go on as if nothing was pressed. The handler here also
remembers the request, and the sweep checks it between trials.

  install()            in the entry point
  raise_if_requested() at a safe point (between trials)
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


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


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
