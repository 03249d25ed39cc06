"""optuna-dashboard opens a sweep's study file as the README says, and shows each trial's
outcome as readable attributes (state, best step, collapse step), not one JSON blob."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from services import free_port
from sweep_helpers import compose_plan, sweep_args


def get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.skipif(shutil.which("optuna-dashboard") is None, reason="pip install 'klein_sweep[dashboard]'")
def test_optuna_dashboard_lists_the_trials_with_readable_outcomes(tmp_path):
    from klein_sweep.sweep.worker import run_sweep

    folder = tmp_path / "sweeps" / "lr_vs_steps"
    run_sweep(compose_plan([*sweep_args("lr_vs_steps", tmp_path), f"sweep.output_dir={folder}", "tracking=none"]), progress=False)
    port = free_port()
    server = subprocess.Popen(["optuna-dashboard", f"sqlite:///{folder / 'study.db'}", "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and studies is None:
            try:
                studies = get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                time.sleep(0.3)
        (study,) = studies
        assert study["study_name"] == "lr_vs_steps"
        detail = get(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
        trials = detail["trials"]
        assert len(trials) == 2
        for trial in trials:
            attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
            assert attrs["state"] in ("underfit", "good", "overfit", "collapsed")  # a plain word, not JSON
            assert attrs["best_step"] in ("2", "4", "null") and attrs["steps"] == "4"
            assert {p["name"] for p in trial["params"]} == {"train.lr"}
    finally:
        server.terminate()
        server.wait(timeout=10)
