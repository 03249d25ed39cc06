"""What went wrong in a trial, and whose fault it is: the machine's (a full disk, a permission
error, the study's storage or the tracking store lost: the trial is interrupted and runs again
after the fix) or the cell's (a failed result that stays failed); out-of-memory, and releasing
the memory a failed trial held.

  machine_fault(exc)      a one-line reason when exc is the machine's fault, else None
  MachineFault            raised by the worker to stop on such a fault
  is_out_of_memory(exc)   CUDA or CPU out of memory
  release_memory()        after a trial
"""

from __future__ import annotations

from klein_sweep.errors import KleinSweepError
from klein_sweep.redaction import redact


class MachineFault(KleinSweepError):
    """The machine, not the cell: a full disk, a permission error, the study's storage or the
    tracking store lost. The worker stops; the trial in flight runs again on the next start."""


# errno values of a machine fault; also recognised in the text of errors that wrap them
# (safetensors and torch.save report "os error 28" / "No space left on device" as their own types).
MACHINE_ERRNOS = {"ENOSPC": "No space left on device", "EDQUOT": "Disk quota exceeded", "EACCES": "Permission denied",
                  "EPERM": "Operation not permitted", "EROFS": "Read-only file system", "EIO": "Input/output error",
                  "EMFILE": "Too many open files"}


def machine_fault(exc: BaseException) -> str | None:
    """A one-line reason when exc is the machine's fault, else None (a settings fault)."""
    import errno

    from klein_sweep.tracking import TrackingError

    if isinstance(exc, TrackingError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in {getattr(errno, name) for name in MACHINE_ERRNOS}:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"machine fault: {exc.strerror or exc}{where}"
    text = str(exc)
    for message in MACHINE_ERRNOS.values():
        if message.lower() in text.lower():
            return f"machine fault: {message} ({exc.__class__.__name__}: {text.splitlines()[0][:200]})"
    try:
        from optuna.exceptions import StorageInternalError
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - both ship with optuna
        return None
    if isinstance(exc, (StorageInternalError, OperationalError)):
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        return f"the study's storage failed ({exc.__class__.__name__}: {redact(first)})"
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def release_memory() -> None:
    """After a trial (above all a failed one, whose optimizer state and activations the
    traceback kept alive until now): collect, and hand cached CUDA blocks back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
