"""What a run prints while it imports its libraries and loads the embedded model: nothing about
torchao (installed with the `quant` extra, which the test extra pulls in) and no loading bars,
with the libraries' logging and bars left as they were for what comes after. Each in a fresh
interpreter: the noise comes with a process's first import only."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import repo_pythonpath

TORCHAO = importlib.util.find_spec("torchao") is not None  # what prints at import only where torchao is installed

LOAD_THE_MINI = """
import logging
from diffusers.utils import logging as diffusers_logging
from klein_sweep.config import build_settings, compose_config
from klein_sweep.heap import freeze_libraries
from klein_sweep.models.loading import load_pipeline, pick_runtime

freeze_libraries()
model = build_settings(compose_config(["tracking=none"])).model  # the embedded default, the mini
assert model.kind == "mini", model
pipe = load_pipeline(model, pick_runtime(model, "cpu"))
print("levels", logging.getLogger("torchao").level, logging.getLogger("torch.utils._pytree").level)
print("bars", diffusers_logging.is_progress_bar_enabled())
"""


def fresh_python(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`python ARGS` in a new interpreter on this checkout's code (the test process has imported
    everything already, and the command server forks from one that has)."""
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_loading_the_mini_prints_no_torchao_warnings_and_no_bars(tmp_path):
    done = fresh_python(["-c", LOAD_THE_MINI], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    if TORCHAO:
        # Without the quiet imports: "Failed to load .../torchao/_C_...so", torch's pytree
        # "register_constant() on Enum subclasses is deprecated" and "Unable to import `torchao` Tensor objects"
        assert "torchao" not in done.stderr and "register_constant" not in done.stderr, done.stderr[-2000:]
    assert "Loading pipeline components" not in done.stderr and "Loading weights" not in done.stderr, done.stderr[-2000:]
    # Afterwards the loggers pass warnings again and the bars are on for a real model's loading.
    assert "levels 0 0" in done.stdout and "bars True" in done.stdout, done.stdout


# Commands whose first import of the model libraries comes before any trial's: a dry run (step 2
# of the README's first real sweep) counts FLOPs on the architecture, as a one-worker sweep's
# parent run does (a GPU sweep's first screen); the LoRA check builds the architecture before it
# reads the file (here a missing one: exit 2 after the imports).
FIRST_IMPORTS = {
    "dry run": ["-m", "klein_sweep", "+sweep=lr_vs_steps", "sweep.dry_run=true", "model=tiny", "data=tiny_character"],
    "LoRA check": ["-m", "klein_sweep.lora.check", "missing.safetensors", "model=tiny"],
}


@pytest.mark.skipif(not TORCHAO, reason="torchao is not installed: nothing of it to print")
@pytest.mark.parametrize("command", list(FIRST_IMPORTS))
def test_commands_that_import_the_model_libraries_first_print_no_torchao_warnings(tmp_path, command):
    done = fresh_python(FIRST_IMPORTS[command], tmp_path)
    assert done.returncode == (2 if command == "LoRA check" else 0), done.stderr[-2000:]
    # Without the quiet import: 5-6 lines, "Failed to load .../torchao/_C_...so", "Detected no
    # triton", torch's "register_constant() on Enum subclasses is deprecated", "Unable to import
    # `torchao` Tensor objects"
    assert "torchao" not in done.stderr and "register_constant" not in done.stderr, done.stderr[-2000:]
