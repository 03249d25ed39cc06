"""A sweep on every CPU core of one machine: the command prepares the study, starts N worker
processes on it (each single-threaded: on 2 cores two workers at once trained 1.56-1.90x the
lane-steps of one alone, one worker on both threads with all five lrs as lanes 1.37-1.65x, two
runs of benchmarks/bench_worker_layout.py), shows one progress bar of finished trials, then
writes the report. The workers are the same code as the many-machines recipe (sweep.role=work),
so no cell runs twice and a killed worker's cell runs again.

  run_on_this_machine(plan)   one worker in this process, or N processes when sweep.workers says so
  resolve_workers(plan)       sweep.workers, or auto: cores on a CPU (at most one per cell), 1 on a GPU
  resolve_lanes(plan, n)      sweep.lanes, or auto: on a CPU the grid's lrs shared among the n workers
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import multiprocessing.connection
import os
import signal
import sys
import time

from klein_sweep.errors import KleinSweepError
from klein_sweep.interrupts import raise_if_requested
from klein_sweep.record import StudyAttr
from klein_sweep.sweep.plan import SweepPlan
from klein_sweep.sweep.parent_run import open_parent_run
from klein_sweep.sweep.worker import SweepSummary, close_parent_run, finish_sweep, prepare_queue, run_sweep

log = logging.getLogger(__name__)


# Auto starts worker processes only for trials at least this long: a process takes ~5 s to
# import torch and load the mini model, more than a few-step trial takes to run.
MIN_STEPS_FOR_PROCESSES = 200
# The command's progress bar re-reads the study this often. Each read loads every trial with its
# attributes and reports, and on SQLite waits for the workers' writes: read twice a second, the
# default sweep's command sat in these reads for ~13 s of a run (sampled, waits included).
PROGRESS_EVERY_S = 5.0


def resolve_workers(plan: SweepPlan) -> int:
    s = plan.sweep
    if s.role != "run":
        return 1
    if s.workers is not None:
        return s.workers
    from klein_sweep.config import build_settings

    if not _cpu_world(plan):
        return 1  # one GPU: one trial at a time; a real model on a CPU: one copy in memory
    settings = build_settings(plan.base_cfg)
    steps = max(plan.step_values or [settings.train.steps or 0])
    if steps < MIN_STEPS_FOR_PROCESSES:
        return 1
    trials = len(plan.cells) or s.n_trials or 1
    return max(1, min(os.cpu_count() or 1, trials))


def resolve_lanes(plan: SweepPlan, workers: int) -> int:
    """sweep.lanes, or auto: on a CPU, the grid's learning rates shared evenly among the
    `workers` this command starts. A sweep.role=work worker cannot know how many others share
    its study: one LoRA per training there, unless sweep.lanes says otherwise."""
    s = plan.sweep
    if s.lanes is not None:
        return s.lanes
    spec = s.params.get("train.lr")
    if s.role != "run" or s.sampler != "grid" or spec is None or spec.type != "categorical" or not _cpu_world(plan):
        return 1
    return max(1, math.ceil(len(spec.values) / max(1, workers)))


def _cpu_world(plan: SweepPlan) -> bool:
    """A sweep of a CPU-sized model on a CPU (the tiny and mini worlds)."""
    from klein_sweep.config import build_settings
    from klein_sweep.models.loading import pick_runtime

    settings = build_settings(plan.base_cfg)
    return pick_runtime(settings.model, settings.train.device).device == "cpu" and settings.model.kind != "pretrained"


def run_on_this_machine(plan: SweepPlan) -> SweepSummary:
    workers = resolve_workers(plan)
    plan.sweep.lanes = resolve_lanes(plan, workers)
    if workers <= 1:
        return run_sweep(plan)
    return run_parallel(plan, workers)


def run_parallel(plan: SweepPlan, workers: int) -> SweepSummary:
    from tqdm.auto import tqdm

    study = prepare_queue(plan)
    context = worker_process_context()  # its imports run while the parent run opens
    new_run = plan.tracking.backend != "none" and not study.user_attrs.get(StudyAttr.PARENT_RUN)
    # The cost prediction counts FLOPs on the model's classes: the first worker, which has them
    # imported, logs it; this process would spend ~6 s of CPU importing them for that alone.
    parent = open_parent_run(study, plan, cost_prediction=False)
    sweep = copy.copy(plan.sweep)  # validated already: a copy, not a rebuilt SweepConfig
    sweep.role, sweep.workers = "work", 1
    work_plans = [dataclasses.replace(plan, sweep=sweep, peers=workers, logs_cost_prediction=new_run and i == 0) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("%d worker processes, %d thread%s each", workers, threads, "s" * (threads > 1))
    processes = [context.Process(target=work, args=(work_plans[i], threads, i), name=f"worker {i}") for i in range(workers)]
    for p in processes:
        p.start()
    total = len(plan.cells) or plan.sweep.n_trials or 0
    bar = tqdm(total=total, desc="trials", unit="trial", disable=None, dynamic_ncols=True)
    try:
        while alive := [p for p in processes if p.is_alive()]:
            trials = study.get_trials(deepcopy=False)
            bar.total = total + refinement_count(trials)  # refinement trainings join after the grid
            bar.n = len(finished_trials(trials))
            bar.refresh()
            # Back as soon as a worker exits; otherwise the next look after PROGRESS_EVERY_S.
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=PROGRESS_EVERY_S)
            raise_if_requested()  # a Ctrl-C swallowed inside a library callback
    except KeyboardInterrupt:
        # A Ctrl-C on a terminal reaches every worker too; a signal sent to this process alone
        # is passed on at once (a worker acts on the first SIGINT and ignores a second). Each
        # worker marks its trial interrupted and exits.
        for p in processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        stop_workers(processes, grace=WORKER_GRACE_S)
        close_parent_run(study, parent, "KILLED")
        raise
    finally:
        done = finished_trials(study.get_trials(deepcopy=False))
        bar.n = len(done)
        bar.close()
    failed_workers = [p.name for p in processes if p.exitcode != 0]
    if failed_workers:
        close_parent_run(study, parent, "KILLED")
        raise KleinSweepError(
            f"sweep {plan.study_name}: {', '.join(failed_workers)} stopped with an error (printed above); finished cells "
            "are kept and the same command runs the rest"
        )
    summary = SweepSummary(ran=[t.number for t in done if t.state.name != "FAIL"],
                           failed=[t.number for t in done if t.state.name == "FAIL"],
                           parent_run_id=getattr(parent, "run_id", None), experiment_id=getattr(parent, "experiment_id", None),
                           workers=workers)
    summary.report_dir = finish_sweep(study, plan, parent)
    return summary


def worker_process_context():
    """Worker processes forked from a fork server that imported the workers' libraries once
    (sweep/preload.py), started now: N workers skip N imports (~6 s of CPU each on 2 cores
    AVX-512). The server is a fresh interpreter that has run no torch operation, so a fork
    inherits no thread pool or lock; it ignores Ctrl-C and exits with this process, and its
    workers with it (_die_with_parent)."""
    import multiprocessing
    from multiprocessing import forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: a fresh interpreter each
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["klein_sweep.sweep.preload"])
    forkserver.ensure_running()
    return context


# Seconds an interrupted worker has to mark its trial and exit. A worker that does not (one
# interrupted inside a storage commit can wait on a lock it will never get) is terminated, then
# killed: its trial stays RUNNING and the same command runs it again.
WORKER_GRACE_S = 10.0


def stop_workers(processes: list, grace: float) -> None:
    """Wait up to `grace` seconds in all for the workers to exit, then SIGTERM, then SIGKILL:
    a Ctrl-C ends the command within seconds whatever a worker was doing."""
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for stop in ("terminate", "kill"):
        alive = [p for p in processes if p.is_alive()]
        if not alive:
            return
        log.warning("%s did not exit %d s after Ctrl-C: %s", ", ".join(p.name for p in alive), grace,
                    "terminating" if stop == "terminate" else "killing")
        for p in alive:
            getattr(p, stop)()
        stage_deadline = time.monotonic() + 3
        for p in alive:
            p.join(timeout=max(0.0, stage_deadline - time.monotonic()))


def refinement_count(trials: list) -> int:
    """Refinement trainings queued so far among the study's `trials` (interrupted ones run again
    under the same spec)."""
    from klein_sweep.sweep.refinement import refine_spec

    return len({spec.key for t in trials if (spec := refine_spec(t)) is not None})


def finished_trials(trials: list) -> list:
    """Of the study's `trials`, those that ran to a result: complete, pruned, or failed for a
    reason of their own."""
    from optuna.trial import TrialState

    from klein_sweep.record import Attr

    return [t for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and Attr.FAILURE in t.user_attrs)]


def work(plan: SweepPlan, threads: int, index: int) -> None:
    """A worker process: take trials until none is left (no report: the parent writes it)."""
    import torch

    from klein_sweep import interrupts

    _die_with_parent()
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[%(asctime)s][worker {index}][%(levelname)s] - %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    interrupts.install(raise_once=True)  # a terminal Ctrl-C and the parent's may both arrive
    try:
        run_sweep(plan, progress=False, report=False)
    except KleinSweepError as exc:
        from klein_sweep.redaction import redact

        print(f"klein_sweep: error: worker {index}: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _die_with_parent() -> None:
    """Linux: a worker whose parent command is killed (SIGKILL, OOM killer) is killed too, like
    a single-process sweep would be; its trial is then recovered by the next start. The worker's
    parent is the fork server, which exits when the command's end closes its pipe."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
