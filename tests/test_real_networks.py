"""The real metric networks load offline from local folders through the same interface as the
mini network (here: tiny random DINOv2 and CLIP built with transformers and saved locally), and
a missing folder stops a sweep before anything is written, naming what to download."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from klein_sweep.evaluation.real_networks import ClipFeatures, Dinov2Features, load_real_network


@pytest.fixture(scope="module")
def local_dinov2(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from klein_sweep.models.tiny import TINY_WORDS, build_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tokenizer(TINY_WORDS + ["red", "blue", "circle", "square", "creature", "sky", "background", "a", "on"])
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def images(n=4, seed=0):
    return torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def test_dinov2_embeds_and_identity_is_a_cosine(local_dinov2, monkeypatch):
    from klein_sweep.evaluation import metrics as M

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = load_real_network("dinov2", {"dinov2": str(local_dinov2)})
    assert isinstance(net, Dinov2Features)
    x = images()
    assert net.embed(x).shape == (4, 32)
    assert M.identity_similarity(net, x[:1], x[:1]) == pytest.approx(1.0, abs=1e-5)
    assert M.identity_similarity(net, x[:2], images(2, seed=1)) < 1.0
    assert M.kid(net, x, images(4, seed=1))[0] == M.kid(net, x, images(4, seed=1))[0]  # the same KID path
    with pytest.raises(Exception, match="Inception Score"):
        net.logits(x)


def test_clip_image_embedding_and_prompt_fidelity(local_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = load_real_network("clip", {"clip": str(local_clip)})
    assert isinstance(net, ClipFeatures)
    x = images()
    assert net.embed(x).shape == (4, 16)
    score = net.text_similarity(x, ["a red circle creature"] * 4)
    assert score != net.text_similarity(x, ["a blue square creature on a sky background"] * 4)


@pytest.mark.parametrize(
    "overrides,key,download",
    [
        (["eval.feature_network=dinov2"], "eval.network_paths.dinov2", "hf download facebook/dinov2-base"),
        (["eval.identity_network=clip"], "eval.network_paths.clip", "hf download openai/clip-vit-large-patch14"),
        (["eval.prompt_fidelity=true"], "eval.network_paths.clip", "hf download openai/clip-vit-large-patch14"),
        (["eval.feature_network=inception"], "eval.network_paths.inception", "pt_inception-2015-12-05"),
        (["eval.identity_network=arcface", "eval.network_paths.arcface=/no/such/dir"], "eval.network_paths.arcface",
         "insightface model pack"),
    ],
)
def test_missing_network_weights_stop_the_sweep_before_anything_is_written(tmp_path, overrides, key, download):
    proc = run_cli("+sweep=lr_vs_steps", "sweep.refine=false", "model=tiny", "data=tiny_character", *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert key in proc.stderr and download in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_sweep_measures_identity_with_dinov2_and_clip_t(tmp_path, local_dinov2, local_clip):
    from sweep_helpers import COMMON, compose_plan

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-3]",
                         "sweep.params.train.steps.values=[2]", "eval.feature_network=dinov2", "eval.identity_network=dinov2",
                         "eval.prompt_fidelity=true",
                         f"eval.network_paths.dinov2={local_dinov2}", f"eval.network_paths.clip={local_clip}",
                         f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}", "tracking=none"])
    run_sweep(plan, progress=False)
    from optuna.trial import TrialState

    from klein_sweep.record import decode_trial

    (trial,) = open_study(plan, create=False).trials
    assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)  # not failed by the missing class head
    (row,) = decode_trial(trial.user_attrs).rows
    assert {"id_sim", "kid", "prior_kid", "leak", "clip_t"} <= set(row.metrics)
    assert "is" not in row.metrics  # DINOv2 has no class logits: no Inception Score, and no failure
    assert row.state in ("good", "underfit", "overfit", "collapsed")
    assert row.metrics["id_sim"] != trial.user_attrs["base"]["id_sim"]  # the LoRA's samples were measured
