"""model.quantize: the frozen transformer's weights in int8 through torchao, the LoRA trained
on top in float32 and saved as an ordinary LoRA that an unquantized model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

pytest.importorskip("torchao", reason="needs the quant extra (torchao)")


def test_int8_base_trains_a_lora_that_loads_into_the_unquantized_model(tmp_path):
    proc = run_cli("model=tiny", "data=tiny_character", "model.quantize=int8", "train.steps=6", "tracking=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora = Path(proc.stdout.split("LoRA: ")[1].splitlines()[0])
    assert "final loss" in proc.stdout and "nan" not in proc.stdout.split("final loss")[1]

    from klein_sweep.lora.compat import load_checked_lora
    from klein_sweep.models.tiny import build_tiny_pipeline

    plain = build_tiny_pipeline(seed=0)
    load_checked_lora(plain, lora, "tiny")
    assert plain.transformer._hf_peft_config_loaded


def test_quantized_layers_carry_the_lora_and_get_gradients():
    import torch

    from klein_sweep.lora.adapters import inject_lora
    from klein_sweep.models.loading import quantize_weights
    from klein_sweep.models.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline(seed=0).transformer.requires_grad_(False)
    quantize_weights(transformer, "int8", "cpu")
    assert "int8" in type(transformer.transformer_blocks[0].attn.to_q.weight).__name__.lower()
    params = inject_lora(transformer, rank=4, alpha=4, preset="attn")
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    x = torch.randn(1, 16, transformer.config.in_channels)
    enc = torch.randn(1, 8, transformer.config.joint_attention_dim)
    out = transformer(hidden_states=x, encoder_hidden_states=enc, timestep=torch.ones(1), img_ids=torch.zeros(16, 4),
                      txt_ids=torch.zeros(8, 4), guidance=None, return_dict=False)[0]
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in params)


def test_fp8_without_a_gpu_is_refused_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    proc = run_cli("model=tiny", "data=tiny_character", "model.quantize=fp8", "train.steps=2", "tracking=none", cwd=tmp_path)
    assert proc.returncode == 2 and "'model.quantize' = 'fp8'" in proc.stderr and "fp8 needs an Ada/Hopper GPU" in proc.stderr and "Traceback" not in proc.stderr
