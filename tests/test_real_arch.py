"""The real FLUX.2 [klein] path at real widths and reduced depth, on the CPU: the 9B and 4B
transformer configs with 1 double + 1 single block, the real VAE config, a Qwen3 of the real
hidden size with 2 layers, saved as a model folder and loaded through from_pretrained - so shape
and dtype bugs of the real path show up on machines without a GPU.

The full-depth version of the same sweep runs where CUDA exists (`gpu`)."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from conftest import run_cli


def write_images(folder, n: int = 4, size: int = 256) -> None:
    """n photos of one made-up character at `size` px: mini-world creatures, upscaled."""
    from klein_sweep.mini.world import caption, render, sample_creature

    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(n):
        creature = sample_creature(rng, identity=("star", "teal", "dotted"), allow_held_out=True)
        render(creature).resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption(creature, rng, identity_words="[trigger]"))


@pytest.fixture(scope="module", params=["9b", "4b"])
def real_width_model(request, tmp_path_factory):
    from klein_sweep.models.random_klein import save_random_klein

    folder = tmp_path_factory.mktemp(f"klein_{request.param}")
    save_random_klein(folder, request.param, double=1, single=1, text_layers=2)
    return request.param, folder


SMOKE = ["data=folder", "data.resolution=256", "train.rank=4", "model.sample_steps=2", "eval.batch_size=2",
         "eval.feature_network=random_conv", "eval.identity_network=same",
         "eval.trigger_prompts=['photo of a [trigger] creature']", "eval.prior_prompts=['a red circle creature']", "eval.seeds=[0,1]"]


@pytest.mark.slow
def test_real_widths_end_to_end(real_width_model, tmp_path):
    size, folder = real_width_model
    write_images(tmp_path / "imgs")
    common = [f"model=flux2_klein_base_{size}", f"model.path={folder}", f"data.path={tmp_path / 'imgs'}", *SMOKE,
              f"data.cache_dir={tmp_path / 'cache'}"]
    # Klein's text layers 9/18/27 do not exist in a 2-layer encoder: refused up front, by name.
    refused = run_cli(*common, "+sweep=lr_vs_steps", "sweep.refine=false", cwd=tmp_path)
    assert refused.returncode == 2 and "model.text_encoder_layers" in refused.stderr and "layer indices <= 2" in refused.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()
    # With layers the encoder has: 2 learning rates x 2 steps, one checkpoint, 2 samples each.
    proc = run_cli(*common, "model.text_encoder_layers=[0,1,2]", "+sweep=lr_vs_steps",
                   "sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.params.train.steps.values=[2]", cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "this worker ran 2 trials, 0 failed" in proc.stdout
    report = (tmp_path / "sweeps" / "lr_vs_steps" / "report.md").read_text()
    assert "lr=1.00e-04" in report and "lr=4.00e-04" in report
    loras = sorted((tmp_path / "sweeps" / "lr_vs_steps" / "trials").glob("*/lora/pytorch_lora_weights.safetensors"))
    assert len(loras) == 2

    # The saved LoRA loads back into the real-width pipeline with diffusers' own loader.
    from diffusers import Flux2KleinPipeline

    from klein_sweep.lora.compat import load_checked_lora

    pipe = Flux2KleinPipeline.from_pretrained(folder)
    load_checked_lora(pipe, loras[0], f"flux2_klein_base_{size}")
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())


@pytest.mark.slow
def test_the_real_size_gpu_sweep_runs_on_the_cpu_in_the_gpus_dtypes(tmp_path):
    """The gpu test's sweep (tests/test_gpu.py) at real widths and 1 + 1 blocks, on the CPU with
    bf16 weights under bf16 autocast as on a GPU: evaluation, MLflow and the diffusers reload of
    the LoRA in those dtypes (192 s on 2 cores)."""
    from test_gpu import run_real_size_sweep

    run_real_size_sweep(tmp_path, "4b", resolution=128, steps=2, device="cpu", double=1, single=1, text_layers=2,
                        extra=["model.text_encoder_layers=[0,1,2]", "model.sample_steps=2", "eval.sample_steps=2",
                               "eval.screening_sample_steps=1", "model.dtype=bfloat16", "train.mixed_precision=bf16"])
