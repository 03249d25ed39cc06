"""Small promises other code leans on: metrics leave training's random stream alone; a worker
tracking to another MLflow store than its study is refused by name."""

from __future__ import annotations

import re

import pytest
import torch

from sweep_helpers import compose_plan, sweep_args


def test_kid_draws_its_subsets_without_touching_the_global_random_stream():
    from klein_sweep.evaluation import metrics as M
    from klein_sweep.evaluation.networks import build_feature_network

    net = build_feature_network("random_conv")
    g = torch.Generator().manual_seed(3)
    real, fake = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)
    torch.manual_seed(1234)
    expected_next = torch.rand(4)  # what training would draw next
    torch.manual_seed(1234)
    first = M.kid(net, real, fake)
    assert torch.equal(torch.rand(4), expected_next)  # as if kid had not run
    assert M.kid(net, real, fake) == first  # and its own draws are the same at every checkpoint


def test_workers_must_track_to_the_study_s_mlflow_store(tmp_path):
    """Decided: one study, one MLflow store (its parent run lives there). A worker started with
    another tracking.uri is refused, naming the key and both values."""
    from klein_sweep.errors import KleinSweepError
    from klein_sweep.sweep.worker import prepare_study

    def plan(uri):
        return compose_plan([*sweep_args("lr_vs_steps", tmp_path), f"sweep.output_dir={tmp_path / 'sweep'}", f"tracking.uri={uri}"])

    first, other = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    prepare_study(plan(first))
    with pytest.raises(KleinSweepError, match=re.escape(f"tracking.uri: study 'lr_vs_steps' tracks to the MLflow store {first}")) as refused:
        prepare_study(plan(other))
    assert f"this command to {other}; join the study with tracking.uri={first}" in str(refused.value)
    assert not (tmp_path / "b.db").exists()  # refused before the other store was touched
