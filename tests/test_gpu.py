"""The CUDA paths, where a GPU exists (`python -m pytest -m gpu`; skipped without CUDA): a bf16
training step, 8-bit AdamW, an fp8 base, and the memory a trial that ran out of it held being
released before the next trial."""

from __future__ import annotations

import gc
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
    baseline = torch.cuda.memory_allocated()
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-4,2e-4]",
                         "sweep.params.train.steps.values=[2,4]", "train.device=cuda", f"data.cache_dir={tmp_path / 'cache'}",
                         f"sweep.output_dir={tmp_path / 'sweep'}", "tracking=none"])
    summary = run_sweep(plan, progress=False)
    assert summary.failed == [0] and summary.ran == [1]
    assert open_study(plan, create=False).trials[0].user_attrs["failure_reason"].startswith("out of memory")
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - baseline < 64 * 2**20  # nothing of either trial is held
