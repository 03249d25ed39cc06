"""What a sweep worker process imports before its first trial, in one module: the command's fork
server imports it once (sweep/parallel.py) and forks every worker from there, so N workers pay the
imports once (~6 s of CPU on 2 cores AVX-512), while the command is still preparing the study and
its MLflow parent run.

Nothing here runs an operation: a process forked from one that has used torch's thread pool
would inherit it in a broken state, one that has only imported torch does not.
"""

from __future__ import annotations

import klein_sweep.sweep.worker  # noqa: F401 - the worker's own code, and what it imports at the top
import klein_sweep.training.trial  # noqa: F401
from klein_sweep.heap import freeze_libraries

# The libraries imported, and what the imports built frozen: the workers forked from here never
# pass over it in a collection, and neither does this server's own exit (~1.5 s of CPU,
# klein_sweep/quick_exit.py).
freeze_libraries()
