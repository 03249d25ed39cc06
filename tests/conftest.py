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
    from klein_sweep.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    return pipe


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m klein_sweep ARGS` in `cwd`, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "klein_sweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
