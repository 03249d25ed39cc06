"""The CUDA paths, where a GPU exists (`python -m pytest -m gpu`; skipped without CUDA): a bf16
training step, 8-bit AdamW, an fp8 base, the memory a trial that ran out of it held being
released before the next trial, and a sweep at real size (the 9B transformer at full depth,
1024 px, random weights)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.gpu


def trained_lora(proc) -> Path:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final loss" in proc.stdout and "nan" not in proc.stdout.split("final loss")[1]
    return Path(proc.stdout.split("LoRA: ")[1].splitlines()[0])


def loads_into_a_cpu_model(lora: Path) -> None:
    from klein_sweep.lora.compat import load_checked_lora
    from klein_sweep.models.tiny import build_tiny_pipeline

    plain = build_tiny_pipeline(seed=0)
    load_checked_lora(plain, lora, "tiny")
    assert plain.transformer._hf_peft_config_loaded


def test_a_bf16_training_step_on_cuda_saves_a_lora_the_cpu_model_loads(tmp_path):
    proc = run_cli("model=tiny", "data=tiny_character", "train.device=cuda", "model.dtype=bfloat16", "train.steps=6",
                   "tracking=none", cwd=tmp_path)
    loads_into_a_cpu_model(trained_lora(proc))


def test_adamw8bit_trains_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes", reason="pip install 'klein_sweep[bnb]'")
    proc = run_cli("model=tiny", "data=tiny_character", "train.device=cuda", "train.optimizer=adamw8bit", "train.steps=6",
                   "tracking=none", cwd=tmp_path)
    loads_into_a_cpu_model(trained_lora(proc))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_quantized_base_trains_on_cuda(tmp_path, mode):
    pytest.importorskip("torchao", reason="pip install 'klein_sweep[quant]'")
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs an Ada or Hopper GPU")
    proc = run_cli("model=tiny", "data=tiny_character", "train.device=cuda", f"model.quantize={mode}", "train.steps=6",
                   "tracking=none", cwd=tmp_path)
    loads_into_a_cpu_model(trained_lora(proc))


def cuda_baseline() -> int:
    """Memory allocated once the matmul libraries hold their workspaces (kept for the process's
    life and counted by memory_allocated; an H200 held 64 MiB more than 0 after a tiny trial):
    what a leak check compares against."""
    a = torch.ones(64, 64, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        a.to(dtype) @ a.to(dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a @ a
    del a
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_a_real_cuda_oom_fails_its_trial_and_frees_the_memory(tmp_path, monkeypatch):
    import klein_sweep.training.loop as loop
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep
    from sweep_helpers import COMMON, compose_plan

    real, calls = loop.flow_matching_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 3:  # mid-trial, with activations held: ask for far more than any GPU has
            torch.empty(1 << 45, dtype=torch.uint8, device="cuda")
        return out

    monkeypatch.setattr(loop, "flow_matching_loss", loss)
    baseline = cuda_baseline()
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-4,2e-4]",
                         "sweep.params.train.steps.values=[2,4]", "train.device=cuda", f"data.cache_dir={tmp_path / 'cache'}",
                         f"sweep.output_dir={tmp_path / 'sweep'}", "tracking=none"])
    summary = run_sweep(plan, progress=False)
    assert summary.failed == [0] and summary.ran == [1]
    assert open_study(plan, create=False).trials[0].user_attrs["failure_reason"].startswith("out of memory")
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - baseline < 64 * 2**20  # nothing of either trial is held



def test_a_real_size_9b_sweep_at_1024px_trains_evaluates_logs_and_saves_loras_diffusers_loads(tmp_path):
    """The real 9B transformer (8 double + 24 single blocks) and VAE, a Qwen3 of the real width with
    28 layers (Klein reads layers 9/18/27), random weights saved as a model folder and loaded by
    from_pretrained: 4 images at 1024 px, 2 learning rates x 20 steps, one checkpoint with 2
    samples, MLflow, the LoRA files reloaded by diffusers. What breaks only at scale (dtype,
    memory after the text encoder is done, the text layers at 512 tokens, the VAE at 1024 px)."""
    run_real_size_sweep(tmp_path, "9b", resolution=1024, steps=20, device="cuda", text_layers=28)


def run_real_size_sweep(tmp_path, size: str, resolution: int, steps: int, device: str, extra=(), **build) -> None:
    import mlflow
    from diffusers import Flux2KleinPipeline

    from klein_sweep.lora.compat import load_checked_lora
    from klein_sweep.models.random_klein import build_random_klein
    from klein_sweep.sweep.worker import run_sweep
    from sweep_helpers import compose_plan
    from test_real_arch import write_images

    cuda = device == "cuda"
    start = time.perf_counter()
    folder = tmp_path / f"klein_{size}"
    pipe = build_random_klein(size, dtype=torch.bfloat16, device=device, **build)
    pipe.save_pretrained(folder)
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    write_images(tmp_path / "imgs", n=4, size=resolution)
    built = time.perf_counter() - start

    plan = compose_plan([
        "+sweep=lr_vs_steps", "sweep.refine=false", "sweep.workers=1", f"model=flux2_klein_base_{size}", f"model.path={folder}",
        "data=folder", f"data.path={tmp_path / 'imgs'}", f"data.resolution={resolution}", f"data.cache_dir={tmp_path / 'cache'}",
        "sweep.params.train.lr.values=[1e-4,4e-4]", f"sweep.params.train.steps.values=[{steps}]", "eval.seeds=[0,1]",
        "eval.trigger_prompts=['photo of a [trigger] creature']", "eval.prior_prompts=['a red circle creature']",
        "eval.feature_network=random_conv", "eval.identity_network=same", f"sweep.output_dir={tmp_path / 'sweep'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.device={device}", *extra])
    summary = run_sweep(plan, progress=False)
    swept = time.perf_counter() - start - built
    figures = f"model built and saved in {built:.0f} s, sweep (2 trials x {steps} steps at {resolution} px, load, encoding, evaluation) {swept:.0f} s"
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        gc.collect()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated() / 2**30
        figures += f", peak GPU memory {peak:.1f} GiB, held after the sweep {held:.2f} GiB on {torch.cuda.get_device_name()}"
    print(f"\nreal-size {size} sweep: {figures}")
    assert sorted(summary.ran) == [0, 1] and not summary.failed

    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "lr=1.00e-04" in report and "lr=4.00e-04" in report
    loras = sorted((tmp_path / "sweep" / "trials").glob("*/lora/pytorch_lora_weights.safetensors"))
    assert len(loras) == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lr_vs_steps"], filter_string="params.`train.lr` != ''")
    assert sorted(runs["params.train.lr"].astype(float)) == [1e-4, 4e-4]
    assert runs["metrics.train/loss"].notna().all()

    reloaded = Flux2KleinPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, dtype=torch.bfloat16)
    load_checked_lora(reloaded, loras[0], f"flux2_klein_base_{size}")
    assert any("lora_A" in n for n, _ in reloaded.transformer.named_parameters())
    if cuda:
        assert held < 1.0  # nothing of the model or the trials is held once the sweep is done
