"""The base model's samples are drawn once and read back from disk by every later start on the
same model, prompts, seeds and recipe: the same reference, nothing sampled. Another model,
recipe or a rebuilt transformer samples again; data.use_cache=false keeps nothing on disk."""

from __future__ import annotations

import shutil

import pytest
import torch
from sweep_helpers import tiny_world

from klein_sweep.evaluation.evaluator import CheckpointEvaluator
from klein_sweep.evaluation.validation import ValidationLosses


@pytest.fixture
def pipeline_calls(monkeypatch):
    """How many times any pipeline denoised a batch."""
    from diffusers import Flux2KleinPipeline

    calls = []
    real = Flux2KleinPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Flux2KleinPipeline, "__call__", counted)
    return calls


def start(settings, pipe, data):
    """What a worker builds before its first trial: the evaluation's base reference and the
    validation losses' prior samples."""
    from klein_sweep.data.folder import load_examples

    evaluator = CheckpointEvaluator(settings, pipe, data, load_examples(settings.data))
    return evaluator.compute_base(), ValidationLosses(settings, pipe, data)


def test_the_next_start_reads_the_base_samples_from_disk_and_samples_nothing(tmp_path, pipeline_calls):
    settings, pipe, data = tiny_world(tmp_path)
    first, first_val = start(settings, pipe, data)
    drawn = len(pipeline_calls)
    assert drawn > 0
    # trigger, prior, prior at other seeds, validation's prior samples: one file each
    assert len(list((tmp_path / "cache" / "base_samples").glob("*.safetensors"))) == 4

    again, again_val = start(settings, pipe, data)
    assert len(pipeline_calls) == drawn  # nothing sampled the second time
    assert torch.equal(again.trigger_images, first.trigger_images) and torch.equal(again.prior_images, first.prior_images)
    assert (again.id_sim, again.leak, again.degenerate, again.prior_kid_noise) == (first.id_sim, first.leak, first.degenerate, first.prior_kid_noise)
    assert torch.equal(again_val.prior.latents, first_val.prior.latents)
    assert again_val.base_prior_loss == first_val.base_prior_loss


def test_the_samples_read_back_are_the_samples_drawn(tmp_path):
    """Stored latents decode to the very images the sampler returned when it drew them."""
    settings, pipe, data = tiny_world(tmp_path, "data.use_cache=false")
    drawn, _ = start(settings, pipe, data)
    cached_settings, _, _ = tiny_world(tmp_path)
    start(cached_settings, pipe, data)  # draws and stores
    read, _ = start(cached_settings, pipe, data)  # reads
    assert torch.equal(read.trigger_images, drawn.trigger_images) and torch.equal(read.prior_images, drawn.prior_images)


@pytest.mark.parametrize("change", ["model.seed=1", "eval.sample_steps=3", "eval.seeds=[0,2]"])
def test_another_model_recipe_or_seeds_samples_again(tmp_path, pipeline_calls, change):
    settings, pipe, data = tiny_world(tmp_path)
    start(settings, pipe, data)
    before = len(pipeline_calls)
    other, other_pipe, other_data = tiny_world(tmp_path, change)
    start(other, other_pipe, other_data)
    assert len(pipeline_calls) > before
    assert len(list((tmp_path / "cache" / "base_samples").glob("*.safetensors"))) > 4


def test_without_the_cache_nothing_is_kept(tmp_path, pipeline_calls):
    settings, pipe, data = tiny_world(tmp_path, "data.use_cache=false")
    start(settings, pipe, data)
    drawn = len(pipeline_calls)
    start(settings, pipe, data)
    assert len(pipeline_calls) == 2 * drawn
    assert not (tmp_path / "cache").exists()


def test_a_rebuilt_mini_transformer_is_another_model(tmp_path, monkeypatch):
    """The mini's cache key reads its transformer's weights: rebuilding the mini
    (python -m klein_sweep.mini.build) must not reuse the old model's samples."""
    from klein_sweep.config import ModelConfig
    from klein_sweep.models import loading
    from klein_sweep.models.registry import MINI_PIPELINE_DIR

    copy = tmp_path / "pipeline"
    shutil.copytree(MINI_PIPELINE_DIR, copy)
    monkeypatch.setattr(loading, "MINI_PIPELINE_DIR", copy)
    mini = ModelConfig(name="mini", kind="mini")
    shipped = loading.transformer_id(mini)
    assert loading.transformer_id(mini) == shipped  # the same weights: the same key
    weights = next((copy / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert loading.transformer_id(mini) != shipped
    assert loading.transformer_id(ModelConfig(name="mini", kind="mini", dtype="bfloat16")) != loading.transformer_id(mini)


def test_workers_starting_together_draw_different_sets_and_read_the_others(tmp_path, monkeypatch):
    """Another worker is drawing the base prior samples (it holds that entry's lock): this one
    draws the trigger and other-seeds sets, waits for the prior set, and reads it once stored
    instead of drawing it too."""
    import threading
    import time

    from klein_sweep.data.folder import load_examples
    from klein_sweep.evaluation import sampling
    from klein_sweep.evaluation.base_samples import BaseSampleCache

    settings, pipe, data = tiny_world(tmp_path)
    evaluator = CheckpointEvaluator(settings, pipe, data, load_examples(settings.data))
    cache = BaseSampleCache.for_settings(settings)
    prior_key = cache.key(pipe, evaluator.prior.embeds, evaluator.negative, evaluator.prior.seeds, evaluator.recipe)
    drawn_by = []  # (thread, seeds) of every set actually denoised
    denoise = sampling._denoise

    def recorded(pipe, embeds, negative, seeds, recipe, attention_kwargs):
        drawn_by.append((threading.current_thread().name, list(seeds)))
        return denoise(pipe, embeds, negative, seeds, recipe, attention_kwargs)

    monkeypatch.setattr(sampling, "_denoise", recorded)
    with cache.drawing(prior_key, wait=False) as held:  # "the other worker" draws the prior set
        assert held
        worker = threading.Thread(target=evaluator.compute_base, name="worker")
        worker.start()
        deadline = time.monotonic() + 60
        while len(list(cache.root.glob("*.safetensors"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker draws the two sets nobody holds
        assert worker.is_alive()  # and waits for the prior set
        sampling.generate(pipe, evaluator.prior.embeds, evaluator.negative, evaluator.prior.seeds, evaluator.recipe, cache=cache)
    worker.join(timeout=60)
    assert not worker.is_alive()
    by_worker = [seeds for name, seeds in drawn_by if name == "worker"]
    assert evaluator.prior.seeds not in by_worker and len(by_worker) == 2  # trigger and other seeds only
    assert [seeds for name, seeds in drawn_by if name != "worker"] == [evaluator.prior.seeds]
    alone, _ = start(*tiny_world(tmp_path / "alone"))  # drawn by one worker from an empty cache: the same reference
    assert torch.equal(evaluator.base.prior_images, alone.prior_images) and evaluator.base.id_sim == alone.id_sim
