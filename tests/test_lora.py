"""LoRA presets, and files that diffusers' own loader reads back to the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from klein_sweep.lora.adapters import inject_lora, lora_weight_norm, resolve_targets
from klein_sweep.lora.io import LORA_WEIGHT_NAME, save_lora
from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_TEXT_LAYERS, build_tiny_pipeline


def test_attn_preset_matches_diffusers_script_and_avoids_modulelist(tiny_pipe):
    names = resolve_targets(tiny_pipe.transformer, "attn")
    assert names == [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    ]
    modules = dict(tiny_pipe.transformer.named_modules())
    assert all(isinstance(modules[n], torch.nn.Linear) for n in names)


def test_all_linear_preset_skips_norm_and_modulation(tiny_pipe):
    names = resolve_targets(tiny_pipe.transformer, "all_linear")
    assert "transformer_blocks.0.ff.linear_in" in names and "transformer_blocks.0.attn.add_q_proj" in names
    assert not any("norm" in n or "modulation" in n for n in names)
    assert set(resolve_targets(tiny_pipe.transformer, "attn")) < set(names)


def sample(pipe, seed=0):
    return pipe(
        prompt="photo of sks creature",
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        text_encoder_out_layers=tuple(TINY_TEXT_LAYERS),
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        output_type="latent",
    ).images


def trained_like(pipe, rank, alpha, preset="attn"):
    """Inject a LoRA and give it non-zero weights, as training would."""
    params = inject_lora(pipe.transformer, rank=rank, alpha=alpha, preset=preset, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return params


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (4, 1.0), (8, 32.0)])
def test_saved_lora_reloads_with_diffusers_and_reproduces_output(tmp_path, rank, alpha):
    pipe = build_tiny_pipeline(seed=0)
    base_out = sample(pipe)
    trained_like(pipe, rank, alpha)
    lora_out = sample(pipe)
    assert not torch.allclose(base_out, lora_out, atol=1e-4), "the LoRA must change the output"
    path = save_lora(pipe.transformer, tmp_path)
    assert path.name == LORA_WEIGHT_NAME and not list(tmp_path.glob(".tmp-*"))

    fresh = build_tiny_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    assert torch.allclose(sample(fresh), lora_out, atol=1e-5)


def test_alpha_metadata_is_what_makes_alpha_not_rank_reload_right(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    trained_like(pipe, rank=4, alpha=1.0)
    lora_out = sample(pipe)
    path = save_lora(pipe.transformer, tmp_path)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 1.0
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(path), stripped / LORA_WEIGHT_NAME)  # same weights, no metadata
    fresh = build_tiny_pipeline(seed=0)
    fresh.load_lora_weights(str(stripped), weight_name=LORA_WEIGHT_NAME)
    assert not torch.allclose(sample(fresh), lora_out, atol=1e-4)


def test_lora_norm_zero_at_gaussian_init_and_grows(tiny_pipe):
    params = inject_lora(tiny_pipe.transformer, rank=4, alpha=4, preset="attn")
    assert lora_weight_norm(tiny_pipe.transformer) == 0.0  # B starts at zero
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    assert lora_weight_norm(tiny_pipe.transformer) > 0


def test_injection_is_seeded():
    a, b = build_tiny_pipeline(0), build_tiny_pipeline(0)
    pa = inject_lora(a.transformer, rank=4, alpha=4, preset="attn", seed=5)
    pb = inject_lora(b.transformer, rank=4, alpha=4, preset="attn", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
