"""The dashboards as a person sees them, in a real browser (headless Chromium): after a small
sweep with refinement, MLflow's runs view (the link the CLI prints) lists every trial with its
state; its chart view opens on the trials' curves, one colour per learning rate across a
continuation; a trial's metrics tab shows each sample grid inside its card; the parent run's
description is the sweep's answer; optuna-dashboard lists the trials. Where things are drawn
is read from the page (tests/services.py, BrowserPage); screenshots are kept in the test's folder.

    python -m pytest -m slow -n 0 tests/test_browser.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from services import BrowserPage, MlflowServer, browse, chromium_bin, free_port, page_text
from sweep_helpers import COMMON, compose_plan

pytestmark = pytest.mark.slow

# The debug-size lr_vs_steps on the tiny model (lr 1e-4 and 4e-4, steps 2 and 4), refined: the tiny
# model does not collapse, so both lrs continue from step 4 to 8.
SWEEP = ["+sweep=lr_vs_steps", *COMMON, "sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.params.train.steps.values=[2,4]",
         "sweep.refine_every=2", "sweep.workers=1"]

SECTIONS = "Array.from(document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]'))"
CARDS = "Array.from(document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]'))"


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """That sweep, tracked to an MLflow store in the folder, as a user's default sweep is."""
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
        started = time.perf_counter()
        summary = run_sweep(compose_plan([*SWEEP, f"data.cache_dir={tmp / 'cache'}", f"sweep.output_dir={folder}", f"tracking.uri={uri}"]),
                            progress=False)
        print(f"the sweep: {time.perf_counter() - started:.1f} s")
    finally:
        os.chdir(here)
    return tmp, folder, uri, summary


def test_mlflow_shows_each_trial_its_curves_and_its_samples(finished_sweep):
    from mlflow.tracking import MlflowClient

    from klein_sweep.tracking import runs_view_route

    tmp, _, uri, summary = finished_sweep
    runs = MlflowClient(uri).search_runs([summary.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert [c.data.tags.get("klein.refine", "grid") for c in children] == ["grid", "grid", "extend", "extend"]
    started = time.perf_counter()
    server = MlflowServer(uri, tmp / "artifacts").start()
    print(f"MLflow server started: {time.perf_counter() - started:.1f} s")
    try:
        started = time.perf_counter()
        view = f"{server.url}/{runs_view_route(summary.experiment_id)}"
        with BrowserPage(width=1600, height=1200) as page:
            # The runs view the CLI links to: every trial listed (not folded under the parent), with its state.
            page.goto(view)
            text = page.wait_for(f"(t => {[c.info.run_name for c in children]!r}.every(n => t.includes(n)) && t)(document.body.innerText)",
                                 what="every trial in the runs table")
            assert "Training runs" in text and "trial/state" in text and "klein.state" in text, text[:3000]
            assert all(c.data.tags["klein.state"] in text for c in children)
            assert text.index(children[0].info.run_name) < text.index(children[1].info.run_name)  # sorted by lr
            page.screenshot(tmp / "mlflow_runs.png")

            # Its chart view opens on the trials' curves, not on the parent's single values (boundary,
            # cost); a continuation draws in its grid trial's colour: one colour per lr.
            page.goto(view + "&compareRunsMode=CHART")
            first = page.wait_for(f"""(() => {{
                const header = {SECTIONS}[0]; if (!header) return null;
                const section = header.closest('[class*="collapse-item"]');
                const lines = Array.from(section.querySelectorAll('[data-testid=experiment-view-compare-runs-card] .scatterlayer path.js-line'));
                return lines.length ? {{name: header.innerText.split('\\n')[0], colours: Array.from(new Set(lines.map(l => l.style.stroke))),
                                        open: section.className.includes('collapse-item-active')}} : null;
            }})()""", what="a line drawn in the chart view's first section")
            page.screenshot(tmp / "mlflow_charts.png")
            assert first["name"] in ("eval", "val", "train") and first["open"], first
            assert len(first["colours"]) == 2, first  # 4 runs, 2 lrs
            sections = page.js(f"{SECTIONS}.map(h => h.innerText.split('\\n')[0])")
            assert sections.index("samples") < sections.index("sweep") < sections.index("cost"), sections

            # A trial's metrics tab: each sample grid (step 0: the base model, where MLflow's image
            # viewer opens) drawn inside its card - not pushed below the card by the run's params.
            child = children[0]
            page.goto(f"{server.url}/#/experiments/{summary.experiment_id}/runs/{child.info.run_id}/model-metrics")
            page.wait_for(f"{SECTIONS}.some(h => h.innerText.startsWith('samples'))", what="the samples section")
            for key in ("trigger", "prior"):
                box = page.wait_for(f"""(() => {{
                    // scrolled to (again while sections above it still draw): cards load when in view
                    {SECTIONS}.find(h => h.innerText.startsWith('samples')).scrollIntoView({{block: 'start'}});
                    const card = {CARDS}.find(c => c.innerText.startsWith('samples/{key}'));
                    const img = card && card.querySelector('img[src*="images%2Fsamples~{key}%2Bstep%2B0%2B"]');
                    if (!img || !img.complete || !img.naturalWidth) return null;
                    const r = img.getBoundingClientRect();
                    // every box that clips it: the card, the card's scrolling body, the window
                    const clips = [[0, 0, innerWidth, innerHeight]];
                    for (let e = img.parentElement; e && e !== card.parentElement; e = e.parentElement)
                        if (e === card || getComputedStyle(e).overflow !== 'visible') {{
                            const b = e.getBoundingClientRect(); clips.push([b.left, b.top, b.right, b.bottom]); }}
                    const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
                    return {{img: [r.left, r.top, r.right, r.bottom], clips, hit: hit === img, text: card.innerText.slice(0, 400)}};
                }})()""", what=f"the samples/{key} grid at step 0")
                left, top, right, bottom = box["img"]
                assert box["hit"] and all(l <= left and t <= top and right <= r and bottom <= b for l, t, r, b in box["clips"]), box
            page.screenshot(tmp / "mlflow_trial_images.png")

            # The parent run's description: the sweep's answer.
            page.goto(f"{server.url}/#/experiments/{summary.experiment_id}/runs/{parent.info.run_id}")
            text = page.wait_for("document.body.innerText.includes('Best cell') && document.body.innerText",
                                 what="the parent run's description")
            assert "Sweep lr_vs_steps: 4 trials finished" in text and "grid, continued past step 4" in text, text[:3000]
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
        assert "lr_vs_steps" in text and "4 Trials" in text and "Trial 0" in text and "Trial 3" in text, text[:3000]
        assert "Parameter train.lr" in text and "User Attributes" in text and "best_step" in text
    finally:
        server.terminate()
        server.wait(timeout=20)
