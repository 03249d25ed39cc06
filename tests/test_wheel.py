"""The package as pip installs it: a wheel, no source tree on the path, run from an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed into a folder of its own (its dependencies
    come from the environment, as they would from pip)."""
    dist = tmp_path_factory.mktemp("dist")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("klein_sweep-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return target


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the installed copy only; the checkout is nowhere on the path
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_runs_the_smoke_job_from_an_empty_folder(installed, tmp_path):
    where = run_installed(installed, tmp_path, "-c", "import klein_sweep; print(klein_sweep.__file__)")
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    assert (installed / "klein_sweep" / "conf" / "sweep" / "lr_vs_steps.yaml").exists()
    assert (installed / "klein_sweep" / "mini" / "weights" / "pipeline" / "model_index.json").exists()
    proc = run_installed(installed, tmp_path, "-m", "klein_sweep", "debug=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 4 steps" in proc.stdout
    assert (tmp_path / "mlflow.db").exists() and list(tmp_path.glob("outputs/*/*/lora/pytorch_lora_weights.safetensors"))


def test_a_users_own_sweep_file_through_config_dir(installed, tmp_path):
    mine = tmp_path / "my_conf" / "sweep"
    mine.mkdir(parents=True)
    (mine / "my_lr.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /klein_sweep_defaults\n  - override /eval: default\n  - _self_\n"
        "sweep:\n  name: my_lr\n  params:\n    train:\n      lr: {type: categorical, values: [1.0e-4, 3.0e-4]}\n"
    )
    proc = run_installed(installed, tmp_path, "-m", "klein_sweep", "--config-dir", str(tmp_path / "my_conf"), "+sweep=my_lr", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name: my_lr" in proc.stdout and "sampler: grid" in proc.stdout  # the defaults came with it
