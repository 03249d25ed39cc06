"""What a run prints while it imports its libraries and loads the embedded model: nothing about
torchao (installed with the `quant` extra, which the test extra pulls in) and no loading bars,
with the libraries' logging and bars left as they were for what comes after."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

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


def test_loading_the_mini_prints_no_torchao_warnings_and_no_bars(tmp_path):
    done = subprocess.run([sys.executable, "-c", LOAD_THE_MINI], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if importlib.util.find_spec("torchao") is not None:  # what prints at import only where torchao is installed
        # Without the quiet imports: "Failed to load .../torchao/_C_...so", torch's pytree
        # "register_constant() on Enum subclasses is deprecated" and "Unable to import `torchao` Tensor objects"
        assert "torchao" not in done.stderr and "register_constant" not in done.stderr, done.stderr[-2000:]
    assert "Loading pipeline components" not in done.stderr and "Loading weights" not in done.stderr, done.stderr[-2000:]
    # Afterwards the loggers pass warnings again and the bars are on for a real model's loading.
    assert "levels 0 0" in done.stdout and "bars True" in done.stdout, done.stdout
