"""The ComfyUI / ai-toolkit export (`diffusion_model.*`, fused q/k/v) read back through
diffusers' own converter gives the same weights, and the same images."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_lora import sample, trained_like

from klein_sweep.lora.io import save_lora
from klein_sweep.lora.export import EXPORT_WEIGHT_NAME, export_comfyui
from klein_sweep.models.tiny import build_tiny_pipeline


def live_deltas(transformer, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """module -> the weight change the LoRA in the model applies, B @ A x alpha / rank, from the
    model's own PEFT layers (not from any file), with the scale checked against peft's own."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            assert module.scaling["default"] == alpha / rank
            a, b = module.lora_A["default"].weight.detach().float(), module.lora_B["default"].weight.detach().float()
            out[name] = (b @ a) * (alpha / rank)
            torch.testing.assert_close(out[name], module.get_delta_weight("default").float(), atol=1e-6, rtol=1e-5)
    return out


@pytest.mark.parametrize("preset,rank,alpha", [("attn", 4, 1.0), ("all_linear", 8, 32.0)])
def test_export_round_trips_through_the_diffusers_converter(tmp_path, preset, rank, alpha):
    from diffusers import Flux2KleinPipeline

    pipe = build_tiny_pipeline(seed=0)
    trained_like(pipe, rank, alpha, preset=preset)
    lora_out = sample(pipe)
    ours = save_lora(pipe.transformer, tmp_path)
    exported = export_comfyui(ours)
    assert exported.name == EXPORT_WEIGHT_NAME and not list(tmp_path.glob(".tmp-*"))
    with safe_open(str(exported), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys  # q/k/v fused
    assert not any(".to_q." in k for k in keys)

    expected = live_deltas(pipe.transformer, rank, alpha)
    assert expected
    converted = Flux2KleinPipeline.lora_state_dict(str(exported))  # diffusers detects the layout itself
    back = {}
    for key, value in converted.items():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        part = part[0]  # "A.weight" -> "A"
        back.setdefault(module, {})[part] = value
    got = {m: p["B"].float() @ p["A"].float() for m, p in back.items()}  # no alpha in the file: scale 1
    assert set(got) == set(expected)
    for module in expected:
        torch.testing.assert_close(got[module], expected[module], atol=1e-6, rtol=1e-5)

    fresh = build_tiny_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path), weight_name=EXPORT_WEIGHT_NAME)
    assert torch.allclose(sample(fresh), lora_out, atol=1e-5)


def test_a_module_without_counterpart_is_named(tmp_path):
    from klein_sweep.lora.export import to_original_layout

    with pytest.raises(ValueError, match="norm_out.linear: no counterpart"):
        to_original_layout({"norm_out.linear": (torch.zeros(2, 4), torch.zeros(4, 2))}, {})
