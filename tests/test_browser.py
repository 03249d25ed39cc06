"""The dashboards as a person sees them, in a real browser (headless Chromium): after a small
sweep, MLflow's runs view (the link the CLI prints) lists every trial with its state, a trial's
metrics tab shows the sample grids by step, and optuna-dashboard lists the trials. Assertions on
the page text of the dumped DOM; screenshots kept in the test's folder.

    python -m pytest -m slow tests/test_browser.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from services import MlflowServer, browse, chromium_bin, free_port, page_text
from sweep_helpers import compose_plan, sweep_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The debug-size lr_vs_steps on the tiny model (lr 1e-4 and 4e-4, steps 2 and 4), tracked
    to an MLflow store in the folder, as a user's default sweep is."""
    if chromium_bin() is None:
        if os.environ.get("KLEIN_SWEEP_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required (KLEIN_SWEEP_REQUIRE_BROWSER=1) but `chromium` was not found")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    from klein_sweep.sweep.worker import run_sweep

    tmp = tmp_path_factory.mktemp("browser")
    folder = tmp / "sweeps" / "lr_vs_steps"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    here = os.getcwd()
    os.chdir(tmp)  # MLflow puts a sqlite store's artifacts under ./mlruns
    try:
        summary = run_sweep(compose_plan([*sweep_args("lr_vs_steps", tmp), f"sweep.output_dir={folder}", f"tracking.uri={uri}"]),
                            progress=False)
    finally:
        os.chdir(here)
    return tmp, folder, uri, summary


def test_mlflow_shows_each_trial_with_its_state_and_the_samples_by_step(finished_sweep):
    from mlflow.tracking import MlflowClient

    from klein_sweep.tracking import runs_view_route

    tmp, _, uri, summary = finished_sweep
    runs = MlflowClient(uri).search_runs([summary.experiment_id])
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    server = MlflowServer(uri, tmp / "artifacts").start()
    try:
        started = time.perf_counter()
        dom = browse(f"{server.url}/{runs_view_route(summary.experiment_id)}", tmp / "mlflow_runs.png")
        text = page_text(dom)
        # the runs view the CLI links to: every trial listed (not folded under the parent), with its state
        assert "Training runs" in text and "trial/state" in text and "klein.state" in text, text[:3000]
        for child in children:
            assert child.info.run_name in text, (child.info.run_name, text[:3000])
        states = [c.data.tags["klein.state"] for c in children]
        assert all(s in text for s in states)
        assert text.index(children[0].info.run_name) < text.index(children[1].info.run_name)  # sorted by lr

        # a trial's metrics tab: charts by section, and the sample grids as images at step 0 (the
        # base model, where MLflow's image viewer opens), not "No image logged at this step"
        child = children[0]
        url = f"{server.url}/#/experiments/{summary.experiment_id}/runs/{child.info.run_id}/model-metrics"
        dom = browse(url, tmp / "mlflow_trial_images.png", wait_ms=300000, height=3000)
        text = page_text(dom)
        assert "samples/trigger" in text and "samples/prior" in text and "val (2)" in text, text[-3000:]  # val: the validation losses
        assert "No image logged at this step" not in text
        for key in ("trigger", "prior"):
            assert f"get-artifact?path=images%2Fsamples~{key}%2Bstep%2B0%2B" in dom, key
        print(f"MLflow pages in the browser: {time.perf_counter() - started:.1f} s")
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("optuna-dashboard") is None, reason="pip install 'klein_sweep[dashboard]'")
def test_optuna_dashboard_lists_the_trials_in_the_browser(finished_sweep):
    tmp, folder, _, _ = finished_sweep
    port = free_port()
    server = subprocess.Popen(["optuna-dashboard", f"sqlite:///{folder / 'study.db'}", "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "optuna-dashboard did not start"
                time.sleep(0.3)
        text = page_text(browse(f"http://127.0.0.1:{port}/dashboard/studies/1/trials", tmp / "optuna_trials.png"))
        assert "lr_vs_steps" in text and "2 Trials" in text and "Trial 0" in text and "Trial 1" in text, text[:3000]
        assert "Parameter train.lr" in text and "User Attributes" in text and "best_step" in text
    finally:
        server.terminate()
        server.wait(timeout=20)
