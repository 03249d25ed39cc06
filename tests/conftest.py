"""Shared fixtures: the tiny pipeline, a copy of the tiny dataset, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = REPO / "klein_sweep" / "assets" / "tiny_character"

# Under pytest-xdist (the default run: -n auto) each test process gets its share of the cores,
# for torch here and for the CLI processes it starts: two 2-thread processes on 2 cores would
# fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A writable copy of the shipped tiny_character dataset."""
    dst = tmp_path / "data"
    shutil.copytree(TINY_DATA, dst)
    return dst


@pytest.fixture
def tiny_pipe():
    from klein_sweep.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    return pipe


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 for this test session (tests/services.py).
    Skipped where PostgreSQL is not installed, unless KLEIN_SWEEP_REQUIRE_POSTGRES=1 (CI sets
    it, and installs the server), where its absence fails the run."""
    from services import PostgresServer, postgres_bin

    if postgres_bin() is None:
        if os.environ.get("KLEIN_SWEEP_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (KLEIN_SWEEP_REQUIRE_POSTGRES=1) but pg_ctl was not found")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` over a PostgreSQL database, as docs/multi_worker.md runs it."""
    from services import MlflowServer

    server = MlflowServer(postgres.create_database("mlflow"), tmp_path_factory.mktemp("mlflow") / "artifacts").start()
    yield server
    server.stop()


def repo_pythonpath() -> str:
    """The checkout first, then whatever PYTHONPATH already holds (packages installed beside the
    environment, e.g. with pip --target, stay importable in the processes a test starts)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def command_server(env: dict):
    """The server that forks the commands of this test process (tests/zygote.py), or None where
    the command needs a fresh interpreter: another PYTHONPATH, or KLEIN_SWEEP_TEST_FRESH=1 (every
    command a new `python`, as before the server: slower, for comparison)."""
    from zygote import ZygoteServer

    if os.environ.get("KLEIN_SWEEP_TEST_FRESH") == "1" or env.get("PYTHONPATH", "") != repo_pythonpath():
        return None
    return ZygoteServer.shared(repo_pythonpath())


def start_python(target: str | Path, *args: str, cwd: Path, env: dict | None = None):
    """`python -m TARGET ARGS` (a module name) or `python TARGET ARGS` (a script's Path) started
    in `cwd`, not waited for: a process of its own with Popen's interface (poll, communicate,
    send_signal), forked from the command server where it can be."""
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), **(env or {})}
    server = command_server(env)
    if server is not None:
        return server.popen(target, list(args), cwd=cwd, env=env)
    head = [str(target)] if isinstance(target, Path) else ["-m", target]
    return subprocess.Popen([sys.executable, *head, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_python(target: str | Path, *args: str, cwd: Path, timeout: float | None = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """start_python, waited for, as subprocess.run(capture_output=True, text=True) returns it."""
    proc = start_python(target, *args, cwd=cwd, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m klein_sweep ARGS` in `cwd`, as a user runs it."""
    return run_python("klein_sweep", *args, cwd=cwd, timeout=timeout, env={"HYDRA_FULL_ERROR": "0", **(env or {})})
