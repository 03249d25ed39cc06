"""A trial's full collections (the encoders released, each trial's memory handed back) skip the
libraries' import-time objects, and still see the model."""

from __future__ import annotations

import gc


def test_prepare_model_freezes_the_libraries_but_not_the_model(tmp_path):
    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.training.trial import prepare_model, resolve_plan

    settings = build_settings(compose_config(["model=tiny", "data=tiny_character", "tracking=none", f"data.cache_dir={tmp_path / 'cache'}"]),
                              output_dir=str(tmp_path / "out"))
    prepared = prepare_model(resolve_plan(settings))
    # torch, diffusers, transformers, MLflow, Optuna, torchmetrics: ~650k objects in a fresh
    # process, moved where collections do not look
    assert gc.get_freeze_count() > 300_000
    # what a collection passes over (the frozen objects are not listed): the model built after
    # the freeze, so a released model is collected
    tracked = {id(o) for o in gc.get_objects()}
    assert id(prepared.pipe.transformer) in tracked and id(prepared.pipe) in tracked
