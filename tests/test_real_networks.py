"""The real metric networks load offline from local folders through the same interface as the
mini network (here: tiny random DINOv2 and CLIP built with transformers and saved locally), and
a missing folder stops a sweep before anything is written, naming what to download."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from metric_networks import save_tiny_clip, save_tiny_dinov2
from klein_sweep.evaluation.real_networks import ClipFeatures, Dinov2Features, load_real_network


@pytest.fixture(scope="module")
def local_dinov2(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def local_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def images(n=4, seed=0):
    return torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def smooth_images(n, seed=1):
    """Flat colours with a horizontal ramp: nothing like the uniform noise of `images`."""
    g = torch.Generator().manual_seed(seed)
    colour, slope = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, 48).view(1, 1, 1, 48)
    return (0.5 * colour + 0.5 * slope * ramp).expand(n, 3, 48, 48).clone()


def uint8_images(n=3, size=32, seed=0):
    """(uint8 HWC PIL images, the same as (N, 3, H, W) floats in [0, 1]) at the network's input
    size, so the networks' own processors neither resize nor crop them."""
    from PIL import Image

    u8 = torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return [Image.fromarray(a.numpy()) for a in u8], u8.permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def dinov2_net(local_dinov2):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_real_network("dinov2", {"dinov2": str(local_dinov2)})


def test_dinov2_embeds_as_the_model_with_its_own_processor(dinov2_net, local_dinov2):
    """The feature is DINOv2's CLS (pooler) output of the image preprocessed as the saved image
    processor does it (ImageNet mean/std), not some other layer or normalisation."""
    from transformers import AutoImageProcessor, Dinov2Model

    assert isinstance(dinov2_net, Dinov2Features)
    pil, x = uint8_images()
    pixels = AutoImageProcessor.from_pretrained(local_dinov2)(images=pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        reference = Dinov2Model.from_pretrained(local_dinov2).eval()(pixel_values=pixels).pooler_output
    got = dinov2_net.embed(x)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="Inception Score"):
        dinov2_net.logits(x)


def test_identity_is_the_mean_cosine_one_for_an_image_with_itself(dinov2_net):
    from klein_sweep.evaluation import metrics as M

    noise, other_noise, smooth = images(8, seed=0), images(8, seed=5), smooth_images(8)
    assert M.identity_similarity(dinov2_net, noise[:1], noise[:1]) == pytest.approx(1.0, abs=1e-5)
    # a mean over all (generated, reference) pairs: symmetric, blind to the samples' order, and
    # over a reference set of two parts the size-weighted mean of the two parts' figures
    sim = M.identity_similarity(dinov2_net, noise, smooth)
    assert sim == pytest.approx(M.identity_similarity(dinov2_net, smooth, noise), abs=1e-6)
    assert sim == pytest.approx(M.identity_similarity(dinov2_net, noise.flip(0), smooth), abs=1e-6)
    parts = (2 * M.identity_similarity(dinov2_net, noise, smooth[:2]) + 6 * M.identity_similarity(dinov2_net, noise, smooth[2:])) / 8
    assert sim == pytest.approx(parts, abs=1e-6)
    # images of the same kind are closer than images of another kind, and never as close as identical
    same_kind = M.identity_similarity(dinov2_net, noise, other_noise)
    other_kind = M.identity_similarity(dinov2_net, noise, smooth)
    assert -1.0 <= other_kind < same_kind < 1.0 - 1e-4


def test_kid_and_fid_are_zero_for_a_set_against_itself_and_grow_as_another_set_replaces_it(dinov2_net):
    """The real sample set against generated sets in which k of the 16 images come from another
    set: the distances start at ~0 and increase with every 4 images replaced."""
    from klein_sweep.evaluation import metrics as M

    n = 16
    real, other = images(n, seed=0), smooth_images(n)
    ks = (0, 4, 8, 12, 16)
    kids = [M.kid(dinov2_net, real, torch.cat([other[:k], real[k:]])) for k in ks]
    fids = [M.fid(dinov2_net, real, torch.cat([other[:k], real[k:]])) for k in ks]
    means = [m for m, _ in kids]
    assert all(std >= 0 for _, std in kids)
    assert means == sorted(means) and len(set(means)) == len(ks), means
    assert fids == sorted(fids) and len(set(fids)) == len(ks), fids
    # against itself: FID is 0; KID (unbiased) is 0 up to its subset noise, far below the other set's
    assert abs(fids[0]) < 1e-3 and abs(means[0]) < 0.05 * means[-1], (fids, means)
    # another draw of the same distribution is ~0 too for the unbiased KID
    assert abs(M.kid(dinov2_net, real, images(n, seed=5))[0]) < 0.05 * means[-1]


def test_kid_draws_its_subsets_the_same_way_whatever_the_global_rng_and_leaves_it_alone(dinov2_net):
    """Every checkpoint's KID uses the same subsets, and training's random stream is untouched."""
    from klein_sweep.evaluation import metrics as M

    real, fake = images(8, seed=0), torch.cat([smooth_images(4), images(4, seed=5)])
    torch.manual_seed(1)
    first = M.kid(dinov2_net, real, fake)
    after_first = torch.rand(3)
    torch.manual_seed(1)
    expected_stream = torch.rand(3)
    torch.manual_seed(2)
    assert M.kid(dinov2_net, real, fake) == first
    assert torch.equal(after_first, expected_stream)


@pytest.fixture(scope="module")
def clip_net(local_clip):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_real_network("clip", {"clip": str(local_clip)})


PROMPTS = ["a red circle creature", "a blue square creature on a sky background", "sky"]


def test_clip_embeds_and_scores_prompts_as_the_clip_model_does(clip_net, local_clip):
    """The image embedding is CLIP's projected image embedding (OpenAI CLIP preprocessing), and
    CLIP-T is the mean over i of cos(image i, prompt i) as CLIPModel's own forward gives it,
    with prompts of different lengths padded in one batch."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    assert isinstance(clip_net, ClipFeatures)
    pil, x = uint8_images()
    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=pil, return_tensors="pt").pixel_values  # CLIP's published mean/std are its defaults
    tokens = AutoTokenizer.from_pretrained(local_clip)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = CLIPModel.from_pretrained(local_clip).eval()(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                                             pixel_values=pixels)
    torch.testing.assert_close(F.normalize(clip_net.embed(x), dim=-1), F.normalize(out.image_embeds, dim=-1), atol=1e-5, rtol=1e-5)
    per_pair = (F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum(-1)
    assert clip_net.text_similarity(x, PROMPTS) == pytest.approx(float(per_pair.mean()), abs=1e-5)
    # image i goes with prompt i: each pair alone scores as in the batch
    for i, prompt in enumerate(PROMPTS):
        assert clip_net.text_similarity(x[i:i + 1], [prompt]) == pytest.approx(float(per_pair[i]), abs=1e-5)
    with pytest.raises(Exception, match="Inception Score"):
        clip_net.logits(x)


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
