"""A Ctrl-C ends a parallel sweep within seconds, whatever its workers do: a worker that does not
exit in its grace period (one stuck on a storage lock it will never get) is terminated, then
killed, instead of being waited on for a minute each (the two-worker Ctrl-C that hung)."""

from __future__ import annotations

import multiprocessing
import signal
import time


def stuck_worker() -> None:
    """A worker that ignores Ctrl-C and SIGTERM, as one blocked inside a commit effectively does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)


def quick_worker() -> None:
    time.sleep(0.2)


def test_workers_that_will_not_exit_are_killed_after_the_grace_period():
    from klein_sweep.sweep.parallel import stop_workers

    context = multiprocessing.get_context("spawn")
    stuck = [context.Process(target=stuck_worker, name=f"worker {i}") for i in range(2)]
    quick = context.Process(target=quick_worker, name="worker 2")
    processes = [*stuck, quick]
    for p in processes:
        p.start()
    time.sleep(1.0)  # spawned and running their loops
    started = time.monotonic()
    stop_workers(processes, grace=1.0)
    took = time.monotonic() - started
    assert not any(p.is_alive() for p in processes)
    assert [p.exitcode for p in stuck] == [-signal.SIGKILL, -signal.SIGKILL]  # SIGTERM ignored: killed
    assert quick.exitcode == 0
    assert took < 1.0 + 3 + 2, took  # the grace, SIGTERM's 3 s (ignored), then SIGKILL at once
