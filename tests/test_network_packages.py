"""A metric network whose packages do not import stops a sweep or a single trial before the
model loads, as the bad-input catalogue does (tests/test_bad_input.py): one line naming the key,
the network and the extra to install, exit status 2, nothing written. Without the check the
import failed when the evaluator was built, after the model had loaded and the study existed."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import pytest

from conftest import run_cli, repo_pythonpath


def assert_refused_before_anything(proc, message: str, cwd: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == []  # no mlflow.db, sweeps/, outputs/, encoding cache


def klein_4b_folder(root: Path) -> Path:
    """A model folder with the config files the checks read and no weights: a run that got as far
    as loading the model would fail on it with another message."""
    folder = root / "klein-base-4b"
    for part, config in (("text_encoder", {"num_hidden_layers": 36}), ("vae", {"block_out_channels": [128, 256, 512, 512]})):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.skipif(find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed here: nothing to refuse")
@pytest.mark.parametrize("command", [["+sweep=lr_vs_steps"], ["eval=default"]], ids=["sweep", "single"])
def test_a_real_model_without_torch_fidelity_is_refused_before_it_loads(tmp_path, command):
    """The real models' default feature network is Inception (eval.feature_network=auto)."""
    weights = {name: tmp_path / name for name in ("inception", "dinov2")}
    for folder in weights.values():
        folder.mkdir()  # the weight folders exist: only the packages are missing
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = run_cli("model=flux2_klein_base_4b", f"model.path={klein_4b_folder(tmp_path)}", "data=tiny_character", *command,
                   *(f"eval.network_paths.{name}={folder}" for name, folder in weights.items()), cwd=cwd)
    assert_refused_before_anything(proc, "config key 'eval.feature_network' = 'inception' is invalid: ", cwd)
    assert "torch-fidelity is not installed; pip install 'klein_sweep[inception]'" in proc.stderr
    assert "eval.feature_network=auto picks inception for model flux2_klein_base_4b" in proc.stderr


@pytest.mark.skipif(find_spec("insightface") is not None and find_spec("onnxruntime") is not None,
                    reason="insightface and onnxruntime are installed here: nothing to refuse")
def test_arcface_without_insightface_is_refused(tmp_path):
    (tmp_path / "arcface").mkdir()
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = run_cli("model=tiny", "data=tiny_character", "+sweep=lr_vs_steps", "eval.identity_network=arcface",
                   f"eval.network_paths.arcface={tmp_path / 'arcface'}", cwd=cwd)
    assert_refused_before_anything(proc, "config key 'eval.identity_network' = 'arcface' is invalid: ", cwd)
    assert "pip install 'klein_sweep[arcface]'" in proc.stderr and "is not installed" in proc.stderr


def test_an_installed_torchvision_that_does_not_import_is_refused(tmp_path):
    """A torchvision built for another torch is found by find_spec and fails only at import."""
    shadow = tmp_path / "shadow"
    (shadow / "torch_fidelity").mkdir(parents=True)
    (shadow / "torch_fidelity" / "__init__.py").write_text("")
    (shadow / "torchvision").mkdir()
    (shadow / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (tmp_path / "inception").mkdir()
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = run_cli("model=tiny", "data=tiny_character", "+sweep=lr_vs_steps", "eval.feature_network=inception",
                   f"eval.network_paths.inception={tmp_path / 'inception'}", cwd=cwd,
                   env={"PYTHONPATH": os.pathsep.join([str(shadow), repo_pythonpath()])})
    assert_refused_before_anything(proc, "config key 'eval.feature_network' = 'inception' is invalid: ", cwd)
    assert ("torchvision is installed but does not import (RuntimeError: operator torchvision::nms does not exist); "
            "install the torchvision build made for torch") in proc.stderr
