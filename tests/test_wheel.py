"""The package as pip installs it: a wheel, no source tree on the path, run from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed into a folder of its own (its dependencies
    come from the environment, as they would from pip)."""
    # Built from a copy of the sources: setuptools keeps the files of earlier builds in the
    # source tree's build/ and would ship one that the checkout no longer has.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "klein_sweep", source / "klein_sweep", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
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


def assert_smoke_trained(proc: subprocess.CompletedProcess, cwd: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 4 steps" in proc.stdout, proc.stdout[-3000:]
    assert list(cwd.glob("outputs/*/*/lora/pytorch_lora_weights.safetensors"))


def test_the_wheels_console_script_runs_from_an_empty_folder(installed, tmp_path):
    """`klein-sweep` imports klein_sweep.__main__ as a module, so Hydra looks its configs up as the
    package klein_sweep.conf (python -m reads them beside the file instead): without
    conf/__init__.py in the wheel it stopped with "Primary config module 'klein_sweep.conf' not found"."""
    assert (installed / "klein_sweep" / "conf" / "__init__.py").exists()
    script = installed / "bin" / "klein-sweep"  # where pip --target puts console scripts
    assert script.exists(), sorted(p.name for p in installed.iterdir())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)  # the installed copy only
    proc = subprocess.run([str(script), "debug=smoke", "tracking=none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert_smoke_trained(proc, tmp_path)


def editable_install_of_this_checkout() -> bool:
    """pip's record of an editable install pointing here (the checkout's own egg-info, found first
    when the checkout is on the path, has none)."""
    for dist in metadata.distributions(name="klein_sweep"):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable") and info.get("url", "").rstrip("/") == REPO.as_uri():
            return True
    return False


def test_the_editable_installs_console_script_runs_from_an_empty_folder(tmp_path):
    script = shutil.which("klein-sweep")
    if script is None:
        pytest.skip("no klein-sweep on PATH: this checkout is not installed with pip install -e .")
    if not editable_install_of_this_checkout():
        pytest.skip(f"the klein-sweep on PATH ({script}) is not an editable install of {REPO}")
    # The checkout is not on the path: klein_sweep comes through the editable install's finder.
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    proc = subprocess.run([script, "debug=smoke", "tracking=none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert_smoke_trained(proc, tmp_path)
