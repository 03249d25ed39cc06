"""The analysis notebook runs top to bottom against a real MLflow store of a sweep."""

from __future__ import annotations

import json

import matplotlib

from conftest import REPO, run_cli
from sweep_helpers import sweep_args

matplotlib.use("Agg")


def test_notebook_runs_on_a_sweeps_mlflow_store(tmp_path, monkeypatch):
    proc = run_cli(*sweep_args("lr_vs_steps", tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("KLEIN_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KLEIN_EXPERIMENT", "lr_vs_steps")
    monkeypatch.chdir(tmp_path)
    nb = json.loads((REPO / "notebooks" / "sweep_analysis.ipynb").read_text())
    namespace: dict = {}
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "notebook", "exec"), namespace)
    assert len(namespace["trials"]) == 2
    assert all(namespace["history"][r.info.run_id]["eval/id_sim"] for r in namespace["trials"])
    assert all(namespace["history"][r.info.run_id]["val/prior_loss"] for r in namespace["trials"])
    assert sorted(r.data.params["train.lr"] for r in namespace["trials"]) == ["0.0001", "0.0004"]
