"""The mini world: deterministic, a feature network that separates identities, a shipped
pipeline that loads offline and draws what it is asked, LoRAs that learn and collapse."""

from __future__ import annotations

import os
import random

import pytest
import torch

from klein_sweep.config import ASSETS_DIR, DataConfig, ModelConfig
from klein_sweep.mini import world


def test_world_is_deterministic_and_large():
    a, b = world.world_samples(50, seed=3), world.world_samples(50, seed=3)
    assert a == b
    assert world.render(a[0][0]).tobytes() == world.render(b[0][0]).tobytes()
    assert world.world_samples(50, seed=4) != a
    combos = 1
    for values in world.ATTRIBUTES.values():
        combos *= len(values)
    assert combos >= 1000


def test_held_out_identities_never_in_pretraining():
    samples = world.world_samples(5000, seed=0)
    assert not any(c.identity in world.HELD_OUT for c, _ in samples)
    assert len({c.identity for c, _ in samples}) == 6 * 8 * 3 - len(world.HELD_OUT)


def test_captions_name_the_identity_or_the_trigger():
    c = world.Creature("star", "teal", "dotted", "two", "hat", "sky")
    assert world.caption(c) == "a teal dotted star creature with two eyes and a hat on a sky background"
    assert world.caption(c, identity_words="[trigger]").startswith("a [trigger] creature")
    assert set(world.caption(c).split()) <= set(world.vocabulary())


@pytest.fixture(scope="module")
def features():
    from klein_sweep.mini.features import load_mini_features

    return load_mini_features()


def images_of(folder):
    from klein_sweep.data.folder import load_examples, load_image

    return torch.stack([(load_image(e.image_path, 32) + 1) / 2 for e in load_examples(DataConfig(path=str(folder), resolution=32))])


def test_feature_network_reads_attributes(features):
    from klein_sweep.mini.build import images_tensor, labels_tensor

    creatures = [c for c, _ in world.world_samples(300, seed=12345, allow_held_out=True)]
    pred, truth = features.predict(images_tensor(creatures)), labels_tensor(creatures)
    for k in world.ATTRIBUTES:
        assert (pred[k] == truth[k]).float().mean() >= 0.95, k


def test_feature_network_separates_identities(features):
    from klein_sweep.evaluation.metrics import identity_similarity

    a, b = images_of(ASSETS_DIR / "mini_character"), images_of(ASSETS_DIR / "mini_character_b")
    same = identity_similarity(features, a[:10], a[10:])
    other = identity_similarity(features, a, b)
    assert same > 0.9 and other < 0.4, (same, other)


@pytest.fixture(scope="module")
def mini_pipe():
    from klein_sweep.models.loading import load_pipeline, pick_runtime

    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = ModelConfig(name="mini", kind="mini", dtype="float32", text_encoder_layers=[1, 2, 3], max_sequence_length=40, sample_steps=20)
    return load_pipeline(cfg, pick_runtime(cfg, "cpu"))


def test_shipped_pipeline_loads_offline_and_draws_what_it_is_asked(mini_pipe, features):
    from diffusers import Flux2KleinPipeline

    assert isinstance(mini_pipe, Flux2KleinPipeline)
    rng = random.Random(5)
    creatures = [world.sample_creature(rng) for _ in range(24)]
    out = mini_pipe(
        prompt=[world.caption(c) for c in creatures], height=32, width=32, num_inference_steps=20, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0), text_encoder_out_layers=(1, 2, 3), max_sequence_length=40, output_type="pt",
    ).images
    pred = features.predict(out)
    colour = sum(int(pred["colour"][i]) == world.ATTRIBUTES["colour"].index(c.colour) for i, c in enumerate(creatures)) / 24
    assert colour >= 0.75, colour


def test_distilled_mini_draws_in_4_steps_without_cfg_what_the_base_draws_in_12_with_it(mini_pipe, features):
    """The shipped student: the same noise, 4 steps and no CFG land near the base's 12-step CFG
    samples, nearer than the base itself gets in 4 steps without CFG (half the distance)."""
    from klein_sweep.models.loading import load_pipeline, pick_runtime

    cfg = ModelConfig(name="mini_distilled", kind="mini", is_distilled=True, dtype="float32", text_encoder_layers=[1, 2, 3],
                      max_sequence_length=40, sample_steps=4, guidance_scale=1.0)
    student = load_pipeline(cfg, pick_runtime(cfg, "cpu"))
    assert student.config.is_distilled and student.vae is not None
    rng = random.Random(11)
    creatures = [world.sample_creature(rng) for _ in range(24)]

    def draw(pipe, steps, guidance):
        return pipe(prompt=[world.caption(c) for c in creatures], height=32, width=32, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(3), text_encoder_out_layers=(1, 2, 3),
                    max_sequence_length=40, output_type="pt").images

    teacher, distilled, base_4 = draw(mini_pipe, 12, 4.0), draw(student, 4, 1.0), draw(mini_pipe, 4, 1.0)
    near, far = (distilled - teacher).pow(2).mean().item(), (base_4 - teacher).pow(2).mean().item()
    assert near < 0.7 * far, (near, far)  # measured: 0.0052 vs 0.0103 (MSE in [0, 1] pixels)
    pred = features.predict(distilled)
    colour = sum(int(pred["colour"][i]) == world.ATTRIBUTES["colour"].index(c.colour) for i, c in enumerate(creatures)) / 24
    assert colour >= 0.75, colour


@pytest.fixture(scope="session")
def mini_cache(tmp_path_factory):
    """One encoding and base-sample cache for the mini trials of this test session, shared by
    its test processes (a worker draws the base samples, the others read them, as a sweep's
    workers do): each trial would otherwise draw the mini's base samples again (~17 s)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each test process's own
    return root / "mini_cache"


def train_and_evaluate(tmp_path, cache, lr: float, steps: int, every: int):
    """One mini LoRA trial with checkpoint evaluation, as a sweep runs it: (rows, base)."""
    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.evaluation.collapse import classify
    from klein_sweep.evaluation.evaluator import CheckpointEvaluator, eval_prompts
    from klein_sweep.record import CheckpointRow
    from klein_sweep.training.trial import prepare_model, resolve_plan, run_training

    overrides = ["eval=default", f"train.lr={lr}", f"train.steps={steps}", f"train.checkpoint_every={every}",
                 f"data.cache_dir={cache}", "tracking=none"]
    settings = build_settings(compose_config(overrides), output_dir=str(tmp_path / "out"))
    plan = resolve_plan(settings)
    trigger, prior = eval_prompts(settings)
    prepared = prepare_model(plan, extra_prompts=trigger + prior)
    evaluator = CheckpointEvaluator(settings, prepared.pipe, prepared.data, plan.examples)
    base = evaluator.compute_base()
    rows = []

    def evaluate(event, model):
        if not event.sampled:  # a validation-loss step (eval.validation_every): nothing sampled there
            return {}, False
        row, _ = evaluator.evaluate()
        rows.append(CheckpointRow(step=event.step, loss=event.loss, metrics=row))
        return {}, False

    from klein_sweep.tracking import NullTracker

    run_training(plan, prepared, NullTracker(), evaluate=evaluate, progress=False)
    return classify(rows, base.stats(), settings.eval), base.stats()


def test_short_lora_at_a_sane_lr_raises_identity_over_the_base(tmp_path, mini_cache):
    rows, base = train_and_evaluate(tmp_path, mini_cache, lr=1e-3, steps=300, every=300)
    assert rows[-1].state != "collapsed", rows[-1]
    # the base draws random creatures for "a sks creature"; the LoRA draws the teal dotted star
    assert rows[-1].value("id_sim") > base.id_sim + 0.1, (rows[-1].value("id_sim"), base.id_sim)


def test_absurd_lr_is_flagged_collapsed(tmp_path, mini_cache):
    # measured: collapsed by concept leak at the first checkpoint (leak 0.45 against the base's 0.15)
    rows, base = train_and_evaluate(tmp_path, mini_cache, lr=1e-2, steps=100, every=100)
    assert any(r.state == "collapsed" for r in rows), [(r.step, r.reason) for r in rows]
